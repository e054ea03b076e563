"""The objectives with missing teacher numbers (a teacher of another tokenizer), against a
float64 reference written here that simply drops what is missing.

- teacher top-k (forward KL, JSD): teacher ids that do not map leave the support; with a tail
  their mass is in the tail on both sides, without one the support is renormalised;
- student top-k (released, renormalized) and overlap: candidates without a teacher number
  leave S_t;
- a row with nothing left has loss 0, and no NaN reaches any gradient;
- rows whose chunk is not one token on both sides train on the chunk's sampled-token reward.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opd.client.configs.groups import ObjectiveConfig
from opd.client.train import objectives as obj
from opd.client.train.positions import TokenBatch

N, V, K, k = 6, 40, 5, 4


def _logp(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)


def _ids(seed: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(V, generator=g)[:width] for _ in range(N)])


def _mask(seed: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(N, width, generator=g) < 0.6
    m[0] = True  # a full row
    m[1] = False  # an empty row
    return m


def _kl(a: list[float], b: list[float]) -> float:
    return sum(math.exp(x) * (x - y) for x, y in zip(a, b, strict=True))


def _tail(logs: list[float]) -> float:
    return math.log(max(1.0 - sum(math.exp(x) for x in logs), 1e-300))


def _lse(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _kept(t: int, ids: torch.Tensor, valid: torch.Tensor, p: torch.Tensor, q_k: torch.Tensor):
    """Row t's student and teacher log-probs at its valid ids (the reference drops the rest);
    None when none is valid."""
    keep = [i for i in range(ids.shape[1]) if valid[t, i]]
    if not keep:
        return None
    return [p[t, ids[t, i]].item() for i in keep], [q_k[t, i].item() for i in keep]


def _grad_is_finite(loss: torch.Tensor, x: torch.Tensor) -> None:
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("tail", [True, False])
def test_teacher_topk_drops_unmapped_ids_into_the_tail(tail):
    p = _logp(0).requires_grad_(True)
    q = _logp(1)
    ids, valid = _ids(2, k), _mask(3, k)
    q_k = q.gather(1, ids)
    got = obj.teacher_topk_forward_kl(p, ids, q_k, tail=tail, valid_Nk=valid)
    for t in range(N):
        row = _kept(t, ids, valid, p, q_k)
        if row is None:
            assert got[t].item() == 0.0
            continue
        lp, lq = row
        want = _kl(lq, lp) + (math.exp(_tail(lq)) * (_tail(lq) - _tail(lp)) if tail else 0.0)
        assert got[t].item() == pytest.approx(want, abs=1e-9)
    _grad_is_finite(got, p)


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_on_the_mapped_support(tail, beta):
    p = _logp(4).requires_grad_(True)
    q = _logp(5)
    ids, valid = _ids(6, k), _mask(7, k)
    q_k = q.gather(1, ids)
    got = obj.teacher_topk_jsd(p, ids, q_k, beta=beta, tail=tail, valid_Nk=valid)
    for t in range(N):
        row = _kept(t, ids, valid, p, q_k)
        if row is None:
            assert got[t].item() == 0.0
            continue
        lp, lq = row
        if tail:
            lp, lq = lp + [_tail(lp)], lq + [_tail(lq)]
        else:
            lp = [x - _lse(lp) for x in lp]
            lq = [x - _lse(lq) for x in lq]
        if beta == 0.0:
            want = _kl(lq, lp)
        elif beta == 1.0:
            want = _kl(lp, lq)
        else:
            pairs = zip(lp, lq, strict=True)
            lm = [math.log(beta * math.exp(b) + (1 - beta) * math.exp(a)) for a, b in pairs]
            want = beta * _kl(lq, lm) + (1 - beta) * _kl(lp, lm)
        assert got[t].item() == pytest.approx(want, abs=1e-9)
    _grad_is_finite(got, p)


@pytest.mark.parametrize("variant", ["released", "renormalized"])
def test_student_topk_leaves_out_candidates_without_a_teacher_number(variant):
    p = _logp(8).requires_grad_(True)
    old = _logp(9)
    q = _logp(10)
    ids, valid = _ids(11, K), _mask(12, K)
    old_K, q_K = old.gather(1, ids), q.gather(1, ids)
    got = obj.student_topk_loss(p, ids, old_K, q_K, variant=variant, cand_valid_NK=valid)
    for t in range(N):
        keep = [i for i in range(K) if valid[t, i]]
        if not keep:
            assert got[t].item() == 0.0
            continue
        lp = [p[t, ids[t, i]].item() for i in keep]
        lo = [old_K[t, i].item() for i in keep]
        lq = [q_K[t, i].item() for i in keep]
        if variant == "renormalized":
            want = _kl([x - _lse(lp) for x in lp], [x - _lse(lq) for x in lq])
        else:  # -sum rho * pbar_old * (log q - log p_old), pbar_old over the kept candidates
            want = -sum(
                math.exp(a - o) * math.exp(o - _lse(lo)) * (b - o)
                for a, o, b in zip(lp, lo, lq, strict=True)
            )
        assert got[t].item() == pytest.approx(want, abs=1e-9)
    _grad_is_finite(got, p)


def test_overlap_counts_only_teacher_ids_that_map():
    p = _logp(13).requires_grad_(True)
    old = _logp(14)
    q = _logp(15)
    cand = _ids(16, K)
    teacher = torch.cat([cand[:, :2], _ids(17, k - 2)], 1)  # two shared ids per row
    valid = torch.ones(N, k, dtype=torch.bool)
    valid[:, 0] = False  # the first shared id does not map: it must not count
    old_K, q_K = old.gather(1, cand), q.gather(1, cand)
    got = obj.overlap_topk_loss(p, cand, old_K, q_K, teacher, teacher_valid_Nk=valid)
    for t in range(N):
        member = [
            i
            for i in range(K)
            if any(cand[t, i] == teacher[t, j] and valid[t, j] for j in range(k))
        ]
        assert 0 not in member
        lo = [old_K[t, i].item() for i in member]
        want = -sum(
            math.exp(p[t, cand[t, i]].item() - old_K[t, i].item())
            * math.exp(old_K[t, i].item() - _lse(lo))
            * (q_K[t, i].item() - old_K[t, i].item())
            for i in member
        )
        assert got[t].item() == pytest.approx(want, abs=1e-9)
    _grad_is_finite(got, p)


@pytest.mark.parametrize("name", obj.OBJECTIVES)
def test_rows_of_longer_chunks_train_on_the_chunks_sampled_reward(name):
    """Rows not one-to-one get exactly the sampled-token loss; the others the objective's."""
    p = _logp(18).to(torch.float32).requires_grad_(True)
    old = _logp(19).to(torch.float32)
    cand, tk = _ids(20, K), _ids(21, k)
    target = _ids(22, 1)[:, 0]
    one = torch.tensor([True, False, True, False, True, True])
    batch = TokenBatch(
        ids_BL=torch.zeros(1, 1, dtype=torch.long),
        mask_BL=torch.ones(1, 1, dtype=torch.long),
        positions=[np.arange(N)],
        seq_offsets=torch.tensor([0, N]),
        target_N=target,
        student_token_logp_N=old.gather(1, target[:, None])[:, 0],
        student_topk_ids_NK=cand,
        student_topk_logp_NK=old.gather(1, cand),
        teacher_token_logp_N=torch.full((N,), -3.0),
        teacher_cand_logp_NK=torch.full((N, K), -2.0),
        teacher_topk_ids_Nk=tk,
        teacher_topk_logp_Nk=torch.full((N, k), -1.5),
        one_to_one_N=one,
        teacher_cand_valid_NK=torch.ones(N, K, dtype=torch.bool),
        teacher_topk_valid_Nk=torch.ones(N, k, dtype=torch.bool),
    )
    config = ObjectiveConfig(name=name)
    got = obj.per_token_loss(config, p, batch)
    sampled = obj.per_token_loss(ObjectiveConfig(name="sampled"), p, batch)
    native = obj.per_token_loss(
        config,
        p,
        TokenBatch(**{**batch.__dict__, "one_to_one_N": None}),
    )
    torch.testing.assert_close(got[~one], sampled[~one])
    torch.testing.assert_close(got[one], native[one])
