"""Generated tasks with exact answers: a verifiable set on any machine, no download.

    opd eval --data task:multiplication:eval --verifier numeric --student ...
    opd train --prompts task:multiplication:train --eval-set task:multiplication:eval ...

A source "task:NAME[:SPLIT]" is every (prompt, answer) row of a small, fixed universe (for
multiplication, a x b for a, b in 2..12), so the set is the same everywhere and for every
seed. SPLIT is "train" or "eval": a fixed, seeded halving of the universe, so training prompts
and evaluation questions never overlap; without it, all rows. Answers are integers: grade them
with the `numeric` verifier (the last number in the completion).

Why these tasks: the embedded SmolLM2-135M-Instruct answers single-digit arithmetic asked for "just
the number" well above chance while its 24-layer quickstart student does not
(docs/evaluation.md has the measurements), and the answers are checkable by a number match.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

PREFIX = "task:"
SPLITS = ("train", "eval")
# The seed of the fixed train / eval halving (part of each task's definition, not a run knob).
_SPLIT_SEED = 20261202


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    verifier: str
    build: Callable[[], list[dict]]


def _multiplication() -> list[dict]:
    return [
        {"prompt": f"What is {a} x {b}? Answer with just the number.", "answer": a * b}
        for a in range(2, 13)
        for b in range(2, 13)
    ]


def _addition() -> list[dict]:
    return [
        {"prompt": f"What is {a} plus {b}? Answer with just the number.", "answer": a + b}
        for a in range(1, 10)
        for b in range(1, 10)
    ]


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "multiplication", "a x b for a, b in 2..12 (121 questions)", "numeric", _multiplication
        ),
        Task("addition", "a plus b for a, b in 1..9 (81 questions)", "numeric", _addition),
    )
}


def is_task(source: str) -> bool:
    return source.startswith(PREFIX)


def task_rows(source: str) -> list[dict]:
    """The rows of "task:NAME[:SPLIT]" (each with "prompt", "answer" and "task" fields)."""
    name, _, split = source[len(PREFIX) :].partition(":")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} in {source!r}: one of {sorted(TASKS)}")
    if split and split not in SPLITS:
        raise ValueError(f"unknown split {split!r} in {source!r}: one of {SPLITS} (or none)")
    rows = [{**row, "task": name} for row in TASKS[name].build()]
    if not split:
        return rows
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(rows))
    half = len(rows) // 2
    keep = order[:half] if split == "eval" else order[half:]
    return [rows[i] for i in sorted(int(i) for i in keep)]
