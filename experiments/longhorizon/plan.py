"""What `python -m experiments.longhorizon` runs: the pair, the data sizes, the OPD budget and
the three arms' knobs, full and tiny. Everything here is fixed before the run; the verdict
rules are in tables.py.

The full plan is sized for 2 CPU cores (docs/long-horizons.md has the measured stage times).
The tiny plan runs every stage of the full one on toy budgets so that CI can check that the
command completes and writes every table; its numbers mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from experiments.longhorizon.models import PairSpec

TEACHER, STUDENT = "teacher", "student"
PLAIN, ADAPTIVE, REANCHOR = "plain", "adaptive", "reanchor"
ARMS = (PLAIN, ADAPTIVE, REANCHOR)


@dataclass(frozen=True)
class Plan:
    """Every size and budget of one seed's study; saved whole in results.json."""

    turns: int  # T: turns per episode in OPD, the probe and evaluation
    models: tuple[PairSpec, ...]  # (teacher, student)
    eval_episodes: int  # held-out greedy episodes per model for the per-turn accuracy
    opd_rows: int  # the OPD row pool (disjoint openings from the eval rows)
    probe_rows: int  # the probe's held-out rows (the first eval rows)
    probe_rollouts: int  # sampled episodes per probe row
    opd_steps: int  # the same budget for every arm
    prompts_per_step: int
    n_rollouts: int
    lr: float
    # k of the student-topk objective and of the top-k overlap: the replication's k = 4 for
    # its 19-symbol vocabulary (experiments/replication/plan.py says why)
    top_k: int = 4
    max_new_tokens: int = 32  # per turn; a scratchpad turn is 20-26 tokens and <eos>
    max_episode_tokens: int = 224  # T = 6 turns of 32 and 5 follow-ups of 5 fit
    # --horizon adaptive: a bucket of 16 tokens is about half a turn (a turn and its follow-up
    # message are ~31 tokens), so the rule can cut between turns; the other knobs are opd's
    # defaults, written here so that the plan says what ran
    horizon_bucket: int = 16
    horizon_fade: float = 0.8
    horizon_smoothing: float = 0.3
    horizon_warmup_steps: int = 3
    horizon_min_tokens: int = 32
    horizon_regrow_steps: int = 5
    # re-anchoring: the teacher writes a turn (from turn 1 on) with probability 0.5 at step 0,
    # falling linearly to 0 at the last step; its turns are context only
    reanchor_prob: float = 0.5
    reanchor_as: str = "context"
    # the per-depth diagnostics the trainer and the probe log (the adaptive rule's bucket)
    depth_bucket: int = 16

    @property
    def late_from(self) -> int:
        """The first of the "last turns" the re-anchoring rule reads: turns j >= T / 2."""
        return (self.turns + 1) // 2


def _pair(seed: int, teacher_steps: int, student_steps: int, scale: int = 1) -> tuple:
    """The teacher (K = 3 turns) and the student (smaller, K = 2 turns)."""
    return (
        PairSpec(
            TEACHER, "the teacher: SFT on correct 3-turn episodes",
            hidden=96 // scale, layers=3 if scale == 1 else 1, steps=teacher_steps, turns=3,
            seed=1000 * seed + 1, data_seed=1000 * seed + 11,
        ),
        PairSpec(
            STUDENT, "the student: smaller, SFT on correct 2-turn episodes",
            hidden=64 // scale, layers=2 if scale == 1 else 1, steps=student_steps, turns=2,
            seed=1000 * seed + 2, data_seed=1000 * seed + 12,
        ),
    )  # fmt: skip


def full_plan(seed: int) -> Plan:
    """The recorded study (per seed): sized so that 3 seeds fit in about an hour on 2 cores."""
    return Plan(
        turns=6,
        models=_pair(seed, teacher_steps=300, student_steps=400),
        eval_episodes=200,
        opd_rows=2000,
        probe_rows=64,
        probe_rollouts=2,
        opd_steps=100,
        prompts_per_step=8,
        n_rollouts=4,
        lr=1e-4,
    )


def tiny_plan(seed: int) -> Plan:
    """Every stage of the full plan on toy budgets (CI): it checks plumbing, not findings."""
    return replace(
        full_plan(seed),
        turns=3,
        models=_pair(seed, teacher_steps=4, student_steps=4, scale=2),
        eval_episodes=6,
        opd_rows=16,
        probe_rows=2,
        probe_rollouts=2,
        opd_steps=4,
        prompts_per_step=2,
        n_rollouts=2,
        max_new_tokens=12,
        max_episode_tokens=60,
        horizon_bucket=8,
        horizon_warmup_steps=1,
        horizon_min_tokens=1,
        horizon_regrow_steps=1,
        depth_bucket=8,
    )
