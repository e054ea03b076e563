"""The one sampling-and-scoring pipeline: teachers parsed, connected, scored, failures handled,
against a real teacher process."""

from __future__ import annotations

import numpy as np
import pytest

from opd.client.configs.groups import TeacherSpec
from opd.client.configs.train import TrainConfig
from opd.client.train.bridge import ScoreSpec
from opd.client.train.objectives import OBJECTIVES, REGISTRY
from opd.client.train.pipeline import collect, connect_teachers
from opd.client.train.rollouts import Rollout
from opd.client.train.trainer import score_spec
from opd.shared.config_cli import from_flags

DEAD = "http://127.0.0.1:9"  # discard port: nothing listens


def test_teacher_spec_parses_name_and_replicas():
    assert TeacherSpec.model_validate("math=http://a:1,http://b:2") == TeacherSpec(
        name="math", urls=["http://a:1", "http://b:2"]
    )
    assert TeacherSpec.model_validate("http://a:1").name is None
    with pytest.raises(ValueError, match="NAME"):
        TeacherSpec.model_validate("math=")


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_the_request_asks_for_what_the_objective_needs(objective):
    base = dict(student="s", teacher_url=["http://t"], objective=objective, teacher_top_k=5)
    lean = score_spec(from_flags(TrainConfig, **base, diagnostics=False))
    entry = REGISTRY[objective]
    assert lean == ScoreSpec(
        top_k=5 if entry.needs_teacher_topk else 0,
        candidates=entry.needs_candidates,
        entropy=False,
    )
    assert score_spec(from_flags(TrainConfig, **base)) == ScoreSpec(
        top_k=5, candidates=True, entropy=True
    )


def _fake_rollouts(chunk, vocab=49152):
    rng = np.random.default_rng(list(chunk))
    out = []
    for i in chunk:
        ids = rng.integers(0, vocab, 12).astype(np.int64)
        out.append(
            Rollout(
                prompt_index=i,
                token_ids=ids,
                prompt_len=4,
                truncated=False,
                student_token_logp_T=np.zeros(8, np.float32),
                student_topk_ids_TK=rng.integers(0, vocab, (8, 3)),
                student_topk_logp_TK=np.zeros((8, 3), np.float32),
                student_entropy_T=np.zeros(8, np.float32),
            )
        )
    return out


def test_a_dead_teacher_is_reported_with_keep_going_and_raises_without(tiny_server):
    spec = ScoreSpec(top_k=4, candidates=True, entropy=True)
    teachers = [("live", [tiny_server]), ("dead", [DEAD])]
    with pytest.raises(Exception):  # noqa: B017 - the client's connection error, re-raised
        connect_teachers(teachers, spec, 3, max_retries=0)
    connected = connect_teachers(teachers, spec, 3, keep_going=True, max_retries=0)
    try:
        assert [t.name for t in connected.teachers] == ["live"]
        assert "dead" in connected.errors
        got = collect(connected.teachers, [[0, 1], [2]], _fake_rollouts, spec)
        scored = got.scored["live"]
        assert [r.prompt_index for r in scored] == [0, 1, 2]
        assert all(r.teacher_cand_logp_TK.shape == (8, 3) for r in scored)
        assert all(r.teacher_topk_ids_Tk.shape == (8, 4) for r in scored)
        assert got.timings["time/score_s"] > 0
    finally:
        connected.close()


def test_two_teachers_score_their_own_copies(tiny_server):
    spec = ScoreSpec()
    connected = connect_teachers([(None, [tiny_server]), (None, [tiny_server])], spec, 3)
    try:
        a, b = (t.name for t in connected.teachers)
        assert b == a + "#2"  # same model name twice: kept apart
        got = collect(connected.teachers, [[0]], _fake_rollouts, spec)
        ra, rb = got.scored[a][0], got.scored[b][0]
        assert ra is not rb
        np.testing.assert_allclose(ra.teacher_token_logp_T, rb.teacher_token_logp_T, atol=1e-5)
        assert ra.teacher_topk_ids_Tk is None and ra.teacher_entropy_T is None  # not asked
    finally:
        connected.close()
