"""Teacher re-anchoring: in episodes, the teacher writes some turns, less and less often.

Deep in a long episode the student's own earlier turns have drifted from anything the teacher
would write, and the teacher's per-token signal there is weak (the method's depth finding).
Guided-OPD (arXiv 2606.15912) lets the teacher take some turns with a decaying schedule, so
the student also learns at depths reached from good prefixes. `opd train --reanchor-prob P`:

- from the second assistant turn on, each turn of each episode is written by the teacher with
  probability p(step) = P * max(0, 1 - step / D) (D = --reanchor-decay-steps, default
  --max-steps); the first turn is always the student's, so every episode trains something;
- the teacher continues the exact ids of the episode so far (POST /v1/generate with token-id
  prompts, opd.client.evaluation.episode_source.TeacherEngine): the turn's ids are the
  teacher's output as returned, cut at the first end-of-turn id;
- the environment answers a teacher-written turn as any other;
- those ids are never trained as student samples: with --reanchor-as context (default) they
  are context for both models, like a tool result; with --reanchor-as target they are also
  off-policy targets, trained with their negative log-likelihood under the student
  (opd.client.train.student_math, the "target" rows of the loss), beside the objective.
With several teachers the episode's own teacher (its prompt's route) writes. The draw is a
function of the episode's seed and the turn index (the seed comes from torch's RNG, which
checkpoints restore), so a resumed run re-anchors the same turns.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from opd.client.configs.groups import ReanchorGroup
    from opd.client.train.engines import RolloutEngine
    from opd.client.train.rollouts import Rollout

# mixed into the draw's seed so it is independent of the turn's sampling seed
_DRAW_SALT = 0x0A7C_4E12


@dataclass(frozen=True)
class Reanchoring:
    """One step's re-anchoring: the probability, and the teacher engine of each row."""

    prob: float
    engines: Sequence[RolloutEngine]


class TimedWriter:
    """A teacher's rollout engine that adds up the seconds its turns take (the step logs them
    as time/reanchor_s: inside time/engine_s otherwise, mixed with the student's sampling)."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.client = engine, engine.client
        self.seconds = 0.0

    def sample(self, prompts: list[list[int]], params: Any, seeds: list[int]) -> Any:
        started = time.perf_counter()
        try:
            return self.engine.sample(prompts, params, seeds)
        finally:
            self.seconds += time.perf_counter() - started


def probability(group: ReanchorGroup, step: int, max_steps: int) -> float:
    """p(step) = prob * max(0, 1 - step / decay_steps): linear to 0, then off."""
    total = group.decay_steps or max_steps
    return group.prob * max(0.0, 1.0 - step / total)


def teacher_writes(seed: int, turn: int, prob: float) -> bool:
    """Whether the teacher writes turn `turn` of the episode with this seed (never turn 0)."""
    if turn == 0 or prob <= 0.0:
        return False
    return bool(np.random.default_rng([seed % 2**62, turn, _DRAW_SALT]).random() < prob)


def target_positions(rollout: Rollout) -> np.ndarray:
    """The positions of a rollout's teacher-written turns (int64, in order; empty if none)."""
    spans = [] if rollout.episode is None else rollout.episode.teacher_spans
    if not spans:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in spans])


def reanchor_metrics(
    rollouts: Sequence[Rollout], prob: float, writers: Sequence[TimedWriter]
) -> dict[str, float]:
    """reanchor/*: this step's probability, the share of turns the teacher wrote, their ids;
    time/reanchor_s: the teacher's writing time this step (the writers' clocks are reset)."""
    teacher = sum(len(r.episode.teacher_spans) for r in rollouts if r.episode is not None)
    student = sum(len(r.scored_spans) for r in rollouts)
    seconds = sum(w.seconds for w in writers)
    for w in writers:
        w.seconds = 0.0
    return {
        "time/reanchor_s": seconds,
        "reanchor/prob": prob,
        "reanchor/teacher_turn_frac": teacher / (teacher + student) if teacher + student else 0.0,
        "reanchor/teacher_tokens": float(sum(len(target_positions(r)) for r in rollouts)),
    }
