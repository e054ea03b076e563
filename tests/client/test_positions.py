"""The per-position schema: flattening once and slicing agree with flattening each slice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opd.client.train.positions import PositionStats, TokenBatch, offsets_of, pad_right
from opd.client.train.rollouts import Rollout


def _rollout(i: int, prompt_len: int, T: int, K: int = 3, k: int = 2, scored: bool = True):
    rng = np.random.default_rng(i)
    ids = rng.integers(0, 50, prompt_len + T).astype(np.int64)
    teacher = (
        dict(
            teacher_token_logp_T=rng.normal(size=T).astype(np.float32),
            teacher_cand_logp_TK=rng.normal(size=(T, K)).astype(np.float32),
            teacher_topk_ids_Tk=rng.integers(0, 50, (T, k)),
            teacher_topk_logp_Tk=rng.normal(size=(T, k)).astype(np.float32),
            teacher_entropy_T=rng.random(T).astype(np.float32),
        )
        if scored
        else {}
    )
    return Rollout(
        prompt_index=i,
        token_ids=ids,
        prompt_len=prompt_len,
        truncated=False,
        student_token_logp_T=rng.normal(size=T).astype(np.float32),
        student_topk_ids_TK=rng.integers(0, 50, (T, K)),
        student_topk_logp_TK=rng.normal(size=(T, K)).astype(np.float32),
        student_entropy_T=rng.random(T).astype(np.float32),
        **teacher,
    )


def test_pad_right_and_offsets():
    ids, mask = pad_right([np.array([1, 2, 3]), np.array([4])])
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert offsets_of([3, 0, 2]).tolist() == [0, 3, 3, 5]


def test_slices_of_the_flattened_step_equal_flattening_each_slice():
    rollouts = [_rollout(i, 2 + i, T) for i, T in enumerate([3, 1, 4, 2, 5])]
    whole = PositionStats.from_rollouts(rollouts).validate()
    assert whole.n_sequences == 5 and whole.n_positions == 15
    for a, b in [(0, 2), (2, 5), (1, 4), (4, 5)]:
        part, direct = whole.sequences(a, b), PositionStats.from_rollouts(rollouts[a:b])
        for name in vars(direct):
            np.testing.assert_array_equal(getattr(part, name), getattr(direct, name), name)
    batch = TokenBatch.build(rollouts[1:3], whole.sequences(1, 3), torch.device("cpu"))
    assert batch.ids_BL.shape == (2, 8)
    assert [p.tolist() for p in batch.positions] == [[3], [4, 5, 6, 7]]
    assert batch.target_N.tolist() == [*rollouts[1].completion, *rollouts[2].completion]
    assert batch.teacher_cand_logp_NK.shape == (5, 3)


def test_unrequested_teacher_fields_stay_none_and_diagnostics_refuse_them():
    stats = PositionStats.from_rollouts([_rollout(0, 2, 3, scored=False)])
    assert stats.teacher_topk_ids_Nk is None and not stats.complete()
    with pytest.raises(ValueError, match="teacher_token_logp_N is missing"):
        stats.validate()
