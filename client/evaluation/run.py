"""Evaluate one source on one set: sample, verify, summarise, and keep every per-prompt result.

    options = GenerateOptions(n=4, temperature=1, seed=0)
    result = evaluate(items, source, load_verifier("math"), options)
    result.summary["mean_at_n"], result.summary["pass_at_k"], result.summary["extraction_failures"]

Prompts go to the source in chunks (progress, bounded memory); chunk c starts at seed + offset,
so prompt i samples with seed + i however the set is chunked (the sources' seed rule).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opd.client.evaluation.data import EvalItem
from opd.client.evaluation.sources import Completion, CompletionSource
from opd.client.evaluation.stats import PromptOutcome, summarize
from opd.client.evaluation.verifiers import Verdict, Verifier
from opd.shared.schemas import GenerateOptions

# Prompts per source call: one engine batch (or one generate request, split under the limits).
EVAL_CHUNK = 64


@dataclass
class PromptResult:
    item: EvalItem
    completions: list[Completion]
    verdicts: list[Verdict]

    @property
    def outcome(self) -> PromptOutcome:
        return PromptOutcome(
            n=len(self.verdicts),
            c=sum(v.correct for v in self.verdicts),
            n_extraction_failures=sum(v.extracted is None for v in self.verdicts),
        )

    def record(self) -> dict[str, Any]:
        """One line of the per-prompt file."""
        return {
            "index": self.item.index,
            "prompt": self.item.prompt,
            "answer": self.item.answer,
            "correct": [v.correct for v in self.verdicts],
            "extracted": [v.extracted for v in self.verdicts],
            "errors": [v.error for v in self.verdicts],
            "completions": [c.text for c in self.completions],
            "truncated": [c.truncated for c in self.completions],
            "completion_tokens": [len(c.token_ids) for c in self.completions],
            **_episode_record(self.completions),
        }


@dataclass
class EvalResult:
    source: str
    params: GenerateOptions
    prompts: list[PromptResult]
    summary: dict[str, Any]

    @property
    def accuracy(self) -> float:
        """mean@n: the mean over prompts of the share of correct samples."""
        return float(self.summary["mean_at_n"])

    def write(self, path: Path) -> None:
        """The per-prompt results, one JSON object per line."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for p in self.prompts:
                f.write(json.dumps(p.record()) + "\n")


def _episode_record(completions: Sequence[Completion]) -> dict[str, Any]:
    """The episode fields of a per-prompt line (none for single completions)."""
    if all(c.turns is None for c in completions):
        return {}
    return {
        "rewards": [c.reward for c in completions],
        "turns": [c.turns for c in completions],
        "turn_correct": [c.turn_correct for c in completions],
    }


# An episode is a success when the environment gives it full reward (rewards lie in [0, 1]).
FULL_REWARD = 1.0


def verify_all(completions: Sequence[Completion], answer: str, verifier: Verifier) -> list[Verdict]:
    """Each completion's grade: an episode with a reward by its environment (correct = full
    reward), anything else by the verifier against the gold answer."""
    return [
        verifier(c.text, answer)
        if c.reward is None
        else Verdict(correct=c.reward >= FULL_REWARD, extracted=f"reward {c.reward:g}")
        for c in completions
    ]


def episode_summary(results: Sequence[PromptResult]) -> dict[str, Any]:
    """Episode figures beside the accuracy: mean reward, turns, and accuracy per turn index
    (the share of episodes that reached turn j and got it right, where the environment grades
    turns), so an evaluation shows where along an episode the student fails."""
    done = [c for r in results for c in r.completions if c.turns is not None]
    if not done:
        return {}
    rewards = [c.reward for c in done if c.reward is not None]
    out: dict[str, Any] = {
        "episodes": len(done),
        "turns_mean": sum(c.turns or 0 for c in done) / len(done),
        "reward_mean": sum(rewards) / len(rewards) if rewards else None,
    }
    graded = [c.turn_correct for c in done if c.turn_correct]
    if graded:
        depth = max(len(g) for g in graded)
        out["turn_accuracy"] = [
            sum(g[j] for g in graded if len(g) > j) / sum(len(g) > j for g in graded)
            for j in range(depth)
        ]
    return out


def evaluate(
    items: Sequence[EvalItem],
    source: CompletionSource,
    verifier: Verifier,
    params: GenerateOptions,
    *,
    k: int | None = None,
    interval: str = "bootstrap",
    prompts: Sequence[str | list[int] | dict] | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Every item answered params.n times by `source` and verified against its gold answer.

    `prompts` overrides what is sent for each item (token ids, or data rows for an episode
    source); by default the item's user message. pass@k uses k = params.n unless given."""
    sent = list(prompts) if prompts is not None else [it.prompt for it in items]
    if len(sent) != len(items):
        raise ValueError(f"prompts: {len(sent)} given for {len(items)} items")
    results: list[PromptResult] = []
    for a in range(0, len(items), EVAL_CHUNK):
        chunk = sent[a : a + EVAL_CHUNK]
        got = source.complete(chunk, params.model_copy(update={"seed": (params.seed or 0) + a}))
        if len(got) != len(chunk):
            raise RuntimeError(f"{source.name}: {len(got)} results for {len(chunk)} prompts")
        for item, completions in zip(items[a : a + EVAL_CHUNK], got, strict=True):
            results.append(
                PromptResult(item, completions, verify_all(completions, item.answer, verifier))
            )
        if on_chunk is not None:
            on_chunk(len(results), len(items))
    summary = summarize(
        [r.outcome for r in results],
        k=k or params.n,
        interval=interval,  # type: ignore[arg-type]
    )
    truncated = [c.truncated for r in results for c in r.completions]
    summary["truncated_rate"] = sum(truncated) / len(truncated) if truncated else 0.0
    summary.update(episode_summary(results))
    return EvalResult(source.name, params, results, summary)
