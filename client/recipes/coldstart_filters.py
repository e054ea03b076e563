"""Which teacher responses are fit to SFT a student on: the cold start's filters.

The paper filters truncated and repetitive responses out of the teacher's cold-start data and its
code rejection-samples for a final answer (docs/method.md, "Recovering a failing
pair"). A response is rejected for the first of these reasons that applies, checked in order:

    empty        no visible text
    truncated    the teacher hit max_tokens before its EOS (finish_reason "length")
    repetition   a degenerate loop: the response ends (up to max_trailing stray tokens) in
                 one chunk of 1..max_period tokens repeated >= min_repeats times and covering
                 >= min_loop_tokens, or (long responses) fewer than min_distinct_ratio of its
                 n-grams are distinct
    no_answer    an answer pattern (regex) is required and the text does not contain it
    low_reward   episodes (--env): a minimum reward is required and the environment gave less
                 (or none)

Works on token ids (any language, any tokenizer) except the answer pattern, which reads text.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

REASONS = ("empty", "truncated", "repetition", "no_answer", "low_reward")


class FilterConfig(BaseModel):
    """Which teacher responses a cold start drops before SFT (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A loop: the tail repeats a chunk of <= max_period tokens until >= min_loop_tokens are
    # covered. 32 tokens of "the the the ..." or of a repeated sentence is never an answer.
    max_period: int = Field(default=64, ge=1, description="repetition: longest repeated chunk")
    min_loop_tokens: int = Field(default=32, ge=1, description="repetition: loop length")
    min_repeats: int = Field(default=3, ge=2, description="repetition: copies of the chunk")
    # A loop may be followed by a few stray tokens (a final "." or newline before the EOS).
    max_trailing: int = Field(default=2, ge=0, description="repetition: stray tokens after")
    # Long responses whose distinct n-gram share is this low are stuck, even without an exact
    # loop (the model cycles through a few phrases). Natural text measures > 0.8 for n = 4.
    ngram: int = Field(default=4, ge=1, description="repetition: n of the distinct n-gram share")
    min_distinct_ratio: float = Field(
        default=0.35, ge=0, le=1, description="repetition: distinct n-gram share"
    )
    min_tokens_for_ratio: int = Field(
        default=64, ge=1, description="repetition: shortest response the share applies to"
    )
    answer_pattern: str | None = Field(
        default=None, description="regex a kept response must contain, e.g. '\\boxed'"
    )
    min_reward: float | None = Field(
        default=None,
        description="episodes (--env): the environment's reward a kept episode reaches, at "
        "least (rejection sampling)",
    )

    @field_validator("answer_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"answer_pattern {value!r}: {exc}") from None
        return value


def repeated_tail(ids: list[int], config: FilterConfig) -> tuple[int, int] | None:
    """(period, repeats) of the shortest chunk whose back-to-back copies end the sequence (up to
    max_trailing stray tokens after them), cover >= min_loop_tokens and number >= min_repeats;
    None if there is no such loop."""
    for trailing in range(min(config.max_trailing, len(ids)) + 1):
        found = _loop_at_end(ids[: len(ids) - trailing], config)
        if found is not None:
            return found
    return None


def _loop_at_end(ids: list[int], config: FilterConfig) -> tuple[int, int] | None:
    n = len(ids)
    for period in range(1, min(config.max_period, n // config.min_repeats) + 1):
        chunk = ids[n - period :]
        repeats = 1
        while (start := n - (repeats + 1) * period) >= 0 and ids[start : start + period] == chunk:
            repeats += 1
        if repeats >= config.min_repeats and repeats * period >= config.min_loop_tokens:
            return period, repeats
    return None


def distinct_ngram_ratio(ids: list[int], n: int) -> float:
    """Distinct n-grams / all n-grams (1.0 for sequences shorter than n)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(Counter(grams)) / len(grams) if grams else 1.0


def rejection_reason(
    text: str,
    token_ids: list[int],
    finish_reason: str,
    config: FilterConfig,
    reward: float | None = None,
) -> str | None:
    """The first reason (REASONS order) to drop this response, or None to keep it.

    token_ids are the completion's content: without the closing EOS (a loop is a loop before it).
    """
    if not text.strip():
        return "empty"
    if finish_reason == "length":
        return "truncated"
    if repeated_tail(token_ids, config) is not None:
        return "repetition"
    if (
        len(token_ids) >= config.min_tokens_for_ratio
        and distinct_ngram_ratio(token_ids, config.ngram) < config.min_distinct_ratio
    ):
        return "repetition"
    if config.answer_pattern is not None and not re.search(config.answer_pattern, text):
        return "no_answer"
    if config.min_reward is not None and (reward is None or reward < config.min_reward):
        return "low_reward"
    return None


def filter_rows(
    rows: list[dict[str, Any]], config: FilterConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """Split rows (each with text, content_ids, finish_reason) into kept and rejected; rejected
    rows get a "reason". Counts hold every reason plus "kept"."""
    kept, rejected = [], []
    counts = dict.fromkeys((*REASONS, "kept"), 0)
    for row in rows:
        reason = rejection_reason(
            row["text"], row["content_ids"], row["finish_reason"], config, row.get("reward")
        )
        if reason is None:
            kept.append(row)
            counts["kept"] += 1
        else:
            rejected.append({**row, "reason": reason})
            counts[reason] += 1
    return kept, rejected, counts
