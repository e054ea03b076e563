"""The teacher-continuation depth probe: does the teacher still know better deep into a response?

For a student rollout y of prompt x and a prefix length L, both the teacher and the student
continue x + y[:L] (several samples each, same seeds), and each continuation is graded as a full
answer (prefix + continuation). The teacher's advantage at L is its accuracy minus the student's
on the same prefixes. The method's long-horizon finding is that this advantage shrinks with L
(+0.37 at a 1K-token prefix to +0.02 at 16K in the paper): deep in a response the teacher's
dense reward carries less that would change the outcome (docs/evaluation.md).

`cut_prefixes` decides which lengths apply to a rollout: only prefixes strictly shorter than its
content (the completion without its EOS), so every continuation has something left to decide;
L = 0 is "from the prompt alone", the plain accuracy of each model on those prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from opd.client.evaluation.sources import CompletionSource
from opd.client.evaluation.stats import bootstrap_interval, wilson_interval
from opd.client.evaluation.verifiers import Verifier
from opd.shared.schemas import GenerateOptions


def cut_prefixes(
    completion_ids: Sequence[int], lengths: Sequence[int], eos_token_id: int | None
) -> list[tuple[int, list[int]]]:
    """(L, completion[:L]) for every distinct L in `lengths` below the content length (the
    completion without a final EOS), in increasing L. Negative lengths are refused."""
    ids = [int(t) for t in completion_ids]
    content = (
        len(ids) - 1 if ids and eos_token_id is not None and ids[-1] == eos_token_id else len(ids)
    )
    out = []
    for length in sorted(set(lengths)):
        if length < 0:
            raise ValueError(f"depth prefix lengths must be >= 0, got {length}")
        if length < content or length == 0:
            out.append((length, ids[:length]))
    return out


@dataclass(frozen=True)
class DepthCase:
    """One continuation point: a rollout's prompt ids + its first `prefix_len` completion ids."""

    rollout: int
    prefix_len: int
    prompt_ids: list[int]
    prefix_ids: list[int]
    answer: str


def depth_cases(
    rollouts: Sequence[tuple[list[int], list[int], str]],
    lengths: Sequence[int],
    eos_token_id: int | None,
) -> list[DepthCase]:
    """Every (rollout, L) point of (prompt ids, completion ids, gold answer) rollouts."""
    return [
        DepthCase(r, length, list(prompt), prefix, answer)
        for r, (prompt, completion, answer) in enumerate(rollouts)
        for length, prefix in cut_prefixes(completion, lengths, eos_token_id)
    ]


def _accuracies(
    cases: Sequence[DepthCase],
    source: CompletionSource,
    params: GenerateOptions,
    verifier: Verifier,
    decode,  # noqa: ANN001
) -> np.ndarray:
    """[cases, n] correctness of `source`'s continuations, graded on prefix + continuation."""
    out = np.zeros((len(cases), params.n), dtype=bool)
    by_len: dict[int, list[int]] = {}
    for i, case in enumerate(cases):
        by_len.setdefault(case.prefix_len, []).append(i)
    for length, idx in sorted(by_len.items()):
        # the continuation keeps the rollout's total budget: max_tokens - L (at least 1)
        p = params.model_copy(update={"max_tokens": max(1, params.max_tokens - length)})
        prompts = [cases[i].prompt_ids + cases[i].prefix_ids for i in idx]
        got = source.complete(prompts, p)
        for i, group in zip(idx, got, strict=True):
            for j, completion in enumerate(group):
                text = decode(cases[i].prefix_ids + list(completion.token_ids))
                out[i, j] = verifier(text, cases[i].answer).correct
    return out


def run_depth_probe(
    cases: Sequence[DepthCase],
    student: CompletionSource,
    teachers: Mapping[str, CompletionSource],
    verifier: Verifier,
    params: GenerateOptions,
    decode,  # noqa: ANN001
) -> dict[str, Any]:
    """The depth curve: per prefix length, the student's and each teacher's continuation
    accuracy (Wilson 95% intervals) and each teacher's advantage (paired per rollout, with a
    bootstrap interval over rollouts). Teachers and student use the same seeds."""
    student_ok = _accuracies(cases, student, params, verifier, decode)
    teacher_ok = {
        name: _accuracies(cases, t, params, verifier, decode) for name, t in teachers.items()
    }
    lengths = sorted({c.prefix_len for c in cases})
    rows = []
    for length in lengths:
        idx = [i for i, c in enumerate(cases) if c.prefix_len == length]
        s = student_ok[idx]
        row: dict[str, Any] = {
            "prefix_tokens": length,
            "rollouts": len(idx),
            "student": _acc(s),
            "teachers": {},
        }
        for name, ok in teacher_ok.items():
            t = ok[idx]
            diff = t.mean(axis=1) - s.mean(axis=1)  # paired: the same prefix, per rollout
            lo, hi = bootstrap_interval(diff.tolist())
            row["teachers"][name] = {
                **_acc(t),
                "advantage": float(diff.mean()),
                "advantage_ci": [lo, hi],
            }
        rows.append(row)
    return {
        "samples": params.n,
        "temperature": params.temperature,
        "max_tokens": params.max_tokens,
        "seed": params.seed,
        "by_prefix": rows,
    }


def _acc(ok: np.ndarray) -> dict[str, Any]:
    lo, hi = wilson_interval(int(ok.sum()), int(ok.size))
    return {"accuracy": float(ok.mean()) if ok.size else float("nan"), "ci": [lo, hi]}


def probe_depth(
    rollouts: Sequence[Any],
    answers: Sequence[str],
    student: CompletionSource,
    teachers: Mapping[str, CompletionSource],
    verifier: Verifier,
    params: GenerateOptions,
    lengths: Sequence[int],
    max_rollouts: int,
    tokenizer: Any,
) -> dict[str, Any]:
    """`opd probe --depth` on scored rollouts (opd.client.train.rollouts.Rollout): a seeded
    subset of at most `max_rollouts`, cut at `lengths`, continued by everyone."""
    rng = np.random.default_rng(params.seed)
    take = sorted(rng.permutation(len(rollouts))[:max_rollouts].tolist())
    triples = [
        (
            rollouts[i].token_ids[: rollouts[i].prompt_len].tolist(),
            rollouts[i].completion.tolist(),
            answers[i],
        )
        for i in take
    ]
    cases = depth_cases(triples, lengths, tokenizer.eos_token_id)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    out = run_depth_probe(cases, student, teachers, verifier, params, decode)
    out["rollouts"] = len(take)
    out["prefix_lengths"] = sorted(set(lengths))
    return out


def probe_depth_turns(
    rollouts: Sequence[Any],
    rows: Sequence[dict],
    student: Any,
    teachers: Mapping[str, Any],
    setup: Any,
    params: Any,
    turns: Sequence[int],
    max_rollouts: int,
    seed: int,
    grade: Any,
) -> dict[str, Any]:
    """`opd probe --depth --env`: the depth probe across turns. For an episode and a turn index
    j, the environment is replayed through the episode's first j assistant turns (the
    student's own), then the student and each teacher play on from turn j (rollout engines:
    the student's, opd.client.evaluation.episode_source.TeacherEngine for a teacher; the same
    seeds), and each continued episode is scored by `grade(rollout, episode)` (the
    environment's reward, or the verifier on the last turn). The teacher's advantage at j is
    its mean score minus the student's on the same starts (paired per episode, bootstrap
    interval): whether, j turns deep, the teacher would still do better from where the
    student stands.

    rows[i]: the data row of rollouts[i] (what the environment was reset with); params: the
    student's SamplingParams with n = continuations per start."""
    rng = np.random.default_rng(seed)
    take = sorted(rng.permutation(len(rollouts))[:max_rollouts].tolist())
    starts = [
        (rows[i], rollouts[i], j)
        for j in sorted(set(turns))
        for i in take
        if j < len(rollouts[i].scored_spans)
    ]
    if any(j < 0 for j in turns):
        raise ValueError(f"depth turns must be >= 0, got {sorted(turns)}")

    def scores(engine: Any) -> np.ndarray:
        played = setup.continue_from(engine, starts, params, seed)
        pairs = zip(starts, played, strict=True)
        return np.array([[grade(r, ep) for ep in group] for (_, r, _), group in pairs])

    student_s = scores(student)
    teacher_s = {name: scores(engine) for name, engine in teachers.items()}
    rows_out = []
    for j in sorted({turn for _, _, turn in starts}):
        idx = [k for k, (_, _, turn) in enumerate(starts) if turn == j]
        s = student_s[idx]
        row: dict[str, Any] = {
            "turn": j,
            "rollouts": len(idx),
            "student": _mean_score(s),
            "teachers": {},
        }
        for name, t_all in teacher_s.items():
            t = t_all[idx]
            diff = t.mean(axis=1) - s.mean(axis=1)
            lo, hi = bootstrap_interval(diff.tolist())
            row["teachers"][name] = {
                **_mean_score(t),
                "advantage": float(diff.mean()),
                "advantage_ci": [lo, hi],
            }
        rows_out.append(row)
    o = params.options
    return {
        "samples": o.n,
        "temperature": o.temperature,
        "max_tokens": o.max_tokens,
        "seed": seed,
        "rollouts": len(take),
        "turns": sorted(set(turns)),
        "by_turn": rows_out,
    }


def _mean_score(x: np.ndarray) -> dict[str, Any]:
    """Mean score (reward or correctness) with a bootstrap interval over starts."""
    if not x.size:
        return {"score": float("nan"), "ci": [float("nan"), float("nan")]}
    lo, hi = bootstrap_interval(x.mean(axis=1).tolist())
    return {"score": float(x.mean()), "ci": [lo, hi]}
