"""Horizon control: how deep the teacher scores and the student trains.

The method's last finding is that OPD's dense per-token signal fades with depth (the
teacher-continuation advantage falls from +0.37 at 1K tokens to +0.02 at 16K in the paper);
Prune-OPD and TOPD act on it by training a prefix only. `opd train --horizon`:

    none            every sampled position is scored and trained (the default)
    fixed:N         positions at depth < N (depth: tokens since the first completion token;
                    in an episode its tool results and user turns count too)
    fixed:Nturns    an episode's first N assistant turns
    adaptive        a depth the running diagnostics choose (AdaptiveHorizon below)

The student still samples whole completions and episodes (the policy it is trained on is
unchanged, the environment still grades the whole episode); the cut is applied to what was
sampled before the student's statistics pass (`cut`), so positions past the horizon are never
sent to the teacher as scored positions (their ids are not sent at all: the sequence ends at
the last kept position) and never enter the loss.

The adaptive rule reads one signal, the per-position top-k overlap |S_t(p) ∩ S_t(q)| / k
(opd.client.train.diagnostics.overlap_ratio): Prune-OPD detects prefix drift from the same
quantity, and unlike the teacher-continuation advantage it comes free with every step's scores.
Per depth bucket of `bucket` tokens it keeps a moving average (weight `smoothing` on the newest
step; a bucket counts in a step only with at least `min_tokens` positions). Bucket b is *faded*
when its average is below `fade` times bucket 0's. The horizon is the start of the first bucket
b >= 1 from which every observed deeper bucket is faded: a single noisy dip with live buckets
after it does not cut. While no bucket inside a bounded horizon is faded and the bound has
held for `regrow_steps` steps, it grows by one bucket (the only way to see whether deeper
positions came back to life); a bucket outside the bound forgets its average, so a regrown
bucket is judged on fresh scores. For the first `warmup_steps` steps every depth is scored.
The state is a few floats, saved in checkpoints, and every rank of a torchrun job updates it
from the same all-reduced sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from opd.client.configs.groups import HorizonGroup
from opd.client.train.diagnostics import overlap_by_depth
from opd.client.train.engines import Sample
from opd.client.train.positions import PositionStats

if TYPE_CHECKING:
    from opd.client.train.episodes import Episode


@dataclass(frozen=True)
class Horizon:
    """A bound on trained positions: depth < tokens and turn index < turns (None: no bound)."""

    tokens: int | None = None
    turns: int | None = None

    @property
    def bounded(self) -> bool:
        return self.tokens is not None or self.turns is not None


UNBOUNDED = Horizon()


def cut_sample(sample: Sample, horizon: Horizon) -> Sample:
    """A single completion's first `horizon.tokens` ids (a completion is one turn)."""
    if horizon.tokens is None or len(sample.completion_ids) <= horizon.tokens:
        return sample
    logp, top = sample.engine_logp_T, sample.topk_ids_TK
    return replace(
        sample,
        completion_ids=sample.completion_ids[: horizon.tokens],
        engine_logp_T=None if logp is None else logp[: horizon.tokens],
        topk_ids_TK=None if top is None else top[: horizon.tokens],
    )


def cut_episode(episode: Episode, horizon: Horizon) -> Episode:
    """An episode's turns within the horizon (the student's trained spans and the teacher's
    written ones alike); its ids end at the last kept position (context after it would be
    scored for nothing). The environment's reward and grades stay: it saw the whole episode."""
    if not horizon.bounded:
        return episode
    info = episode.info
    limit = episode.prompt_len + (horizon.tokens if horizon.tokens is not None else 1 << 62)
    # every turn in order, whoever wrote it: (start, end, written by the teacher)
    turns = sorted(
        [(int(a), int(b), False) for a, b in episode.spans.tolist()]
        + [(int(a), int(b), True) for a, b in info.teacher_spans]
    )
    spans: list[tuple[int, int]] = []
    span_turns: list[int] = []
    teacher: list[tuple[int, int]] = []
    for turn, (a, b, by_teacher) in enumerate(turns):
        if (horizon.turns is not None and turn >= horizon.turns) or a >= limit:
            break
        kept = (a, min(b, limit))
        if by_teacher:
            teacher.append(kept)
        else:
            spans.append(kept)
            span_turns.append(turn)
    end = max(b for _, b in spans + teacher)
    if end == len(episode.token_ids):
        return episode  # nothing past the horizon
    n_kept = sum(b - a for a, b in spans)
    logp, top = episode.engine_logp_T, episode.topk_ids_TK
    return replace(
        episode,
        token_ids=episode.token_ids[:end],
        spans=np.asarray(spans, dtype=np.int64).reshape(-1, 2),
        engine_logp_T=None if logp is None else logp[:n_kept],
        topk_ids_TK=None if top is None else top[:n_kept],
        info=replace(info, span_turns=span_turns, teacher_spans=teacher),
    )


def trained_count(sampled: Sample | Episode) -> int:
    """Positions a sampled completion or episode would train (its completion, its spans)."""
    if isinstance(sampled, Sample):
        return len(sampled.completion_ids)
    return int((sampled.spans[:, 1] - sampled.spans[:, 0]).sum())


def cut(sampled: Sample | Episode, horizon: Horizon) -> Sample | Episode:
    return (
        cut_sample(sampled, horizon)
        if isinstance(sampled, Sample)
        else cut_episode(sampled, horizon)
    )


@dataclass
class HorizonCounts:
    """One step's positions before and after the cut (summed over its samples)."""

    sampled: int = 0
    kept: int = 0

    def add(self, before: int, after: int) -> None:
        self.sampled += before
        self.kept += after

    def metrics(self, horizon: Horizon) -> dict[str, float]:
        """horizon/*: the bound, the share of sampled positions cut, the positions the teacher
        did not score (and the student did not train) because of it."""
        out = {
            "horizon/cut_frac": (self.sampled - self.kept) / self.sampled if self.sampled else 0.0,
            "horizon/positions_cut": float(self.sampled - self.kept),
            "horizon/positions_kept": float(self.kept),
        }
        if horizon.tokens is not None:
            out["horizon/tokens"] = float(horizon.tokens)
        if horizon.turns is not None:
            out["horizon/turns"] = float(horizon.turns)
        return out


def bucket_sums(
    depth_N: np.ndarray, signal_N: np.ndarray, bucket: int, n_buckets: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-bucket sums and counts of a per-position signal ([n_buckets] each; deeper positions
    fall in the last bucket), the form that all-reduces across ranks."""
    index = np.minimum(np.asarray(depth_N, dtype=np.int64) // bucket, n_buckets - 1)
    ok = ~np.isnan(signal_N)
    sums = np.bincount(index[ok], weights=signal_N[ok], minlength=n_buckets)
    counts = np.bincount(index[ok], minlength=n_buckets).astype(np.float64)
    return sums, counts


def faded_from(signal: dict[int, float], fade: float) -> int | None:
    """The first bucket b >= 1 from which every known deeper bucket is below fade x bucket 0's
    signal; None when bucket 0 is unknown or the signal holds somewhere deeper than every
    faded run."""
    if 0 not in signal or not np.isfinite(signal[0]):
        return None
    floor = fade * signal[0]
    first: int | None = None  # start of the trailing run of faded buckets
    for b in sorted(k for k in signal if k >= 1):
        faded = signal[b] < floor
        first = (b if first is None else first) if faded else None
    return first


def recommend(
    depth_N: np.ndarray, signal_N: np.ndarray, group: HorizonGroup
) -> tuple[int | None, dict[int, float]]:
    """The adaptive rule on one batch (opd probe): the recommended horizon in tokens (None:
    the signal holds to the deepest bucket seen) and each bucket's mean signal."""
    n = int(np.max(depth_N) // group.bucket) + 1 if len(depth_N) else 1
    sums, counts = bucket_sums(depth_N, signal_N, group.bucket, n)
    signal = {b: sums[b] / counts[b] for b in range(n) if counts[b] >= group.min_tokens}
    faded = faded_from(signal, group.fade)
    return (None if faded is None else faded * group.bucket), signal


@dataclass
class AdaptiveHorizon:
    """The adaptive rule's running state (module docstring): per-bucket moving averages of the
    overlap, the current bound in buckets (None: unbounded) and the steps observed."""

    group: HorizonGroup
    n_buckets: int
    average: dict[int, float] = field(default_factory=dict)
    buckets: int | None = None
    steps: int = 0
    held: int = 0  # steps since the bound last changed

    @property
    def horizon(self) -> Horizon:
        if self.buckets is None:
            return UNBOUNDED
        return Horizon(tokens=self.buckets * self.group.bucket)

    def observe(self, sums: np.ndarray, counts: np.ndarray) -> None:
        """One step's per-bucket overlap sums and counts (all ranks' together)."""
        g = self.group
        seen = [b for b in range(self.n_buckets) if counts[b] >= g.min_tokens]
        for b in seen:
            x = float(sums[b] / counts[b])
            old = self.average.get(b)
            self.average[b] = x if old is None else (1 - g.smoothing) * old + g.smoothing * x
        self.steps += 1
        if self.steps <= g.warmup_steps:
            return
        before = self.buckets
        faded = faded_from(self._within(), g.fade)
        if faded is not None:
            self.buckets = max(1, faded)
        elif (
            self.buckets is not None and (self.buckets - 1) in seen and self.held >= g.regrow_steps
        ):
            grown = self.buckets + 1
            self.buckets = None if grown >= self.n_buckets else grown
        self.held = self.held + 1 if self.buckets == before else 0
        if self.buckets is not None:  # unscored from now on: a regrown bucket starts afresh
            for b in range(self.buckets, self.n_buckets):
                self.average.pop(b, None)

    def _may_grow(self, seen: list[int]) -> bool:
        """Bounded, its deepest bucket scored this step, and the bound held long enough."""
        if self.buckets is None or (self.buckets - 1) not in seen:
            return False
        return self.held >= self.group.regrow_steps

    def _within(self) -> dict[int, float]:
        """The averages the rule may read: buckets inside the current bound (deeper ones are
        stale, they were not scored)."""
        if self.buckets is None:
            return dict(self.average)
        return {b: v for b, v in self.average.items() if b < self.buckets}

    def state(self) -> dict[str, Any]:
        return {
            "average": {str(b): v for b, v in self.average.items()},
            "buckets": self.buckets,
            "steps": self.steps,
            "held": self.held,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.average = {int(b): float(v) for b, v in state["average"].items()}
        self.buckets = state["buckets"]
        self.steps = int(state["steps"])
        self.held = int(state["held"])


class HorizonControl:
    """What the trainer holds: the configured rule, the current horizon, the step's counts."""

    def __init__(self, group: HorizonGroup, max_depth: int) -> None:
        kind, tokens, turns = group.parsed()
        self.kind = kind
        self.fixed = Horizon(tokens=tokens, turns=turns)
        self.adaptive = (
            AdaptiveHorizon(group, n_buckets=max(1, -(-max_depth // group.bucket)))
            if kind == "adaptive"
            else None
        )

    @property
    def active(self) -> bool:
        return self.kind != "none"

    @property
    def horizon(self) -> Horizon:
        return self.adaptive.horizon if self.adaptive is not None else self.fixed

    def step_sums(self, stats: PositionStats) -> tuple[np.ndarray, np.ndarray]:
        """This rank's per-bucket overlap sums and counts (adaptive only), to all-reduce."""
        assert self.adaptive is not None
        a = self.adaptive
        return bucket_sums(*overlap_by_depth(stats), a.group.bucket, a.n_buckets)

    def observe(self, sums: np.ndarray, counts: np.ndarray) -> None:
        """A step's all-ranks sums: the adaptive rule moves the horizon for the next step."""
        if self.adaptive is not None:
            self.adaptive.observe(sums, counts)

    def state(self) -> dict[str, Any] | None:
        return None if self.adaptive is None else self.adaptive.state()

    def load_state(self, state: dict[str, Any] | None) -> None:
        if self.adaptive is not None and state is not None:
            self.adaptive.load_state(state)


def count_cut(
    sampled: Sequence[Sample | Episode], horizon: Horizon, counts: HorizonCounts
) -> list[Sample | Episode]:
    """`sampled` cut to the horizon, the positions before and after added to `counts`."""
    out = []
    for s in sampled:
        kept = cut(s, horizon)
        counts.add(trained_count(s), trained_count(kept))
        out.append(kept)
    return out
