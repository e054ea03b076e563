"""Per-teacher diagnostics of a multi-teacher step (opd.client.train.teacher_metrics): each
teacher's keys equal the diagnostics of its rollouts alone, shares add up, and the report's
helpers find the teachers back."""

from __future__ import annotations

import numpy as np
import pytest

from opd.client.train.diagnostics import compute_diagnostics
from opd.client.train.positions import PositionStats
from opd.client.train.teacher_metrics import one_teacher, per_teacher_metrics, teachers_in
from tests.client.test_rollout_store import make_rollout


def _diagnostics(stats: PositionStats) -> dict[str, float]:
    return compute_diagnostics(stats, depth_bucket=4)


def test_each_teacher_gets_the_diagnostics_of_its_own_rollouts() -> None:
    rng = np.random.default_rng(3)
    rollouts = [make_rollout(rng, i, 3, int(t)) for i, t in enumerate([5, 7, 2, 9, 4])]
    owners = ["math", "code", "math", "math", "code"]
    got = per_teacher_metrics(rollouts, owners, ["math", "code", "chat"], _diagnostics)

    for name in ("math", "code"):
        mine = [r for r, o in zip(rollouts, owners, strict=True) if o == name]
        alone = _diagnostics(PositionStats.from_rollouts(mine))
        logged = one_teacher(got, name)
        assert set(logged) == {*alone, "token_share"}
        for key, value in alone.items():  # the same numbers (NaN where undefined, in both)
            np.testing.assert_equal(logged[key], value, err_msg=key)
    assert got["teacher/math/token_share"] == pytest.approx(16 / 27)
    assert got["teacher/code/token_share"] == pytest.approx(11 / 27)
    # a teacher with nothing this step logs its share only
    assert one_teacher(got, "chat") == {"token_share": 0.0}
    assert teachers_in(list(got)) == ["math", "code", "chat"]


def test_owners_must_match_the_rollouts() -> None:
    rollouts = [make_rollout(np.random.default_rng(0), 0, 2, 3)]
    with pytest.raises(ValueError, match="2 teacher names for 1 rollouts"):
        per_teacher_metrics(rollouts, ["a", "b"], ["a", "b"], _diagnostics)
