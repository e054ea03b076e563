"""The method's diagnostics per teacher of a multi-teacher run.

Why: the method's two conditions (compatible thinking patterns, new knowledge) hold per
student-teacher pair, so a failing math teacher can hide inside a healthy average over math
and code. Each teacher's rollouts get the full diagnostics on their own, under
`teacher/<name>/<key>` (depth buckets included), next to the step's overall keys, and each
teacher's share of the step's completion tokens as `teacher/<name>/token_share`. A teacher
with no rollouts in a step logs only its share (0): a mean over nothing would be noise.

The per-teacher numbers are exactly what a single-teacher run would log on the same rollouts:
the same function on the same positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from opd.client.train.positions import PositionStats
from opd.client.train.rollouts import Rollout

PREFIX = "teacher/"


def per_teacher_metrics(
    rollouts: Sequence[Rollout],
    teacher_of: Sequence[str],
    names: Sequence[str],
    diagnostics: Callable[[PositionStats], dict[str, float]],
) -> dict[str, float]:
    """`diagnostics` of each teacher's rollouts, keyed `teacher/<name>/...`, and token shares.

    `teacher_of[i]` names the teacher that scored `rollouts[i]`."""
    if len(teacher_of) != len(rollouts):
        raise ValueError(f"{len(teacher_of)} teacher names for {len(rollouts)} rollouts")
    total = sum(r.completion_len for r in rollouts) or 1
    out: dict[str, float] = {}
    for name in names:
        mine = [r for r, t in zip(rollouts, teacher_of, strict=True) if t == name]
        tokens = sum(r.completion_len for r in mine)
        out[f"{PREFIX}{name}/token_share"] = tokens / total
        if tokens:
            for key, value in diagnostics(PositionStats.from_rollouts(mine)).items():
                out[f"{PREFIX}{name}/{key}"] = value
    return out


def teachers_in(keys: Sequence[str]) -> list[str]:
    """The teacher names a run's metric keys carry, in first-seen order (for the report)."""
    seen: dict[str, None] = {}
    for key in keys:
        if key.startswith(PREFIX) and key.count("/") >= 2:
            seen.setdefault(key[len(PREFIX) :].split("/", 1)[0], None)
    return list(seen)


def one_teacher(record: dict[str, float], name: str) -> dict[str, float]:
    """A step's record as a single-teacher run of `name` would have logged it: its
    `teacher/<name>/` keys with the prefix removed (what the report's checks read)."""
    prefix = f"{PREFIX}{name}/"
    return {k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix)}
