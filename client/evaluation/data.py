"""Evaluation sets: prompts with the answers a verifier checks completions against.

The sources are the training prompt sets' (opd.client.train.prompts.load_rows): JSONL, Parquet,
a folder saved with datasets' save_to_disk, or a generated task ("task:NAME", see
opd.client.evaluation.tasks). Answers may be strings or numbers in the file; they are compared
as text by the verifiers, so numbers are written back the way JSON spells them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EvalItem:
    """One question: its row in the set, the prompt (a user message) and the gold answer."""

    index: int
    prompt: str
    answer: str


def load_eval_set(
    source: str,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    limit: int | None = None,
    seed: int = 0,
) -> list[EvalItem]:
    """The items of `source`; with `limit`, a seeded subset of that many in row order (the same
    subset for the same seed, so before / after / teacher are measured on the same questions)."""
    from opd.client.train.prompts import load_rows

    rows, where = load_rows(source)
    items = [_item(i, row, prompt_field, answer_field, where) for i, row in enumerate(rows)]
    if not items:
        raise ValueError(f"{where}: no rows")
    if limit is not None and limit < len(items):
        keep = np.random.default_rng(seed).choice(len(items), size=limit, replace=False)
        items = [items[i] for i in sorted(int(k) for k in keep)]
    return items


def _item(i: int, row: Any, prompt_field: str, answer_field: str, where: str) -> EvalItem:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: row {i} is not an object")
    prompt = row.get(prompt_field)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: row {i} has no non-empty string field {prompt_field!r}")
    return EvalItem(
        i, prompt, answer_text(row.get(answer_field), f"{where}: row {i}", answer_field)
    )


def answer_text(value: Any, where: str, field: str) -> str:
    """A gold answer as text: strings as they are, numbers as JSON writes them (1, 0.5, -3)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{where} has no answer in field {field!r} (got {value!r})")
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where} has an empty answer in field {field!r}")
        return value
    if isinstance(value, int | float):
        return json.dumps(value)
    raise ValueError(f"{where}: field {field!r} must be a string or a number, got {value!r}")
