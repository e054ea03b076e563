"""opd.client.train.objectives against independent hand computations (loss and gradient).

Every reference below is written out per row and per candidate with plain loops over the
formula, never by calling the module; gradients of both sides w.r.t. the student *logits*
come from torch.autograd and are compared with a random weighting of the rows, so a loss that
mixed rows up would fail. Sizes are tiny and float64 so tolerances can be tight.
"""

from __future__ import annotations

import ast
import inspect
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor

from opd.client.train import objectives
from opd.client.train.objectives import (
    OBJECTIVES,
    ObjectiveConfig,
    discounted_advantages,
    needs_candidates,
    needs_teacher_topk,
    overlap_topk_loss,
    sampled_token_loss,
    student_topk_loss,
    teacher_topk_forward_kl,
    teacher_topk_jsd,
)

N, V, K, KT = 5, 11, 4, 3  # rows, vocab, student top-K, teacher top-k
DT = torch.float64


# --------------------------------------------------------------------------------------------
# Helpers written independently of the module
# --------------------------------------------------------------------------------------------


def _log_softmax_row(logits_V: Tensor) -> Tensor:
    """log p(v) = z_v - log sum_u exp(z_u), spelled out."""
    return logits_V - torch.log(torch.exp(logits_V).sum())


def _weights(seed: int = 7) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, generator=g, dtype=DT) + 0.5


def _grad(fn: Callable[[Tensor], Tensor], logits_NV: Tensor, w_N: Tensor) -> tuple[Tensor, Tensor]:
    """(loss_N, d(sum_t w_t loss_t)/d logits) for a function of the student logits."""
    x = logits_NV.detach().clone().requires_grad_(True)
    loss_N = fn(x)
    (g,) = torch.autograd.grad((w_N * loss_N).sum(), x, allow_unused=True)
    return loss_N.detach(), torch.zeros_like(x) if g is None else g


class Case:
    """A small random micro-batch: student logits now and at rollout, teacher logits, ids."""

    def __init__(self, seed: int = 0, k_teacher: int = KT) -> None:
        g = torch.Generator().manual_seed(seed)
        self.logits_NV = torch.randn(N, V, generator=g, dtype=DT) * 1.5
        # The rollout-time student differs a little from the current one (ratio != 1).
        self.old_logits_NV = self.logits_NV + 0.3 * torch.randn(N, V, generator=g, dtype=DT)
        self.teacher_logits_NV = torch.randn(N, V, generator=g, dtype=DT) * 1.5
        self.old_logp_NV = torch.log_softmax(self.old_logits_NV, -1)
        self.teacher_logp_NV = torch.log_softmax(self.teacher_logits_NV, -1)
        self.sampled_N = torch.multinomial(self.old_logp_NV.exp(), 1, generator=g).squeeze(-1)
        self.cand_ids_NK = self.old_logp_NV.topk(K, dim=-1).indices
        self.teacher_ids_Nk = self.teacher_logp_NV.topk(k_teacher, dim=-1).indices


# --------------------------------------------------------------------------------------------
# discounted_advantages
# --------------------------------------------------------------------------------------------


def test_discounted_advantages_by_hand() -> None:
    rewards_N = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=DT)
    offsets = torch.tensor([0, 3, 5])
    torch.testing.assert_close(discounted_advantages(rewards_N, offsets, 0.0), rewards_N)
    # gamma = 0.5: seq 1 = [1 + .5*2 + .25*3, 2 + .5*3, 3], seq 2 = [4 + .5*5, 5]
    expected = torch.tensor([2.75, 3.5, 3.0, 6.5, 5.0], dtype=DT)
    torch.testing.assert_close(discounted_advantages(rewards_N, offsets, 0.5), expected)


def test_discounted_advantages_matches_loop_with_empty_sequences() -> None:
    g = torch.Generator().manual_seed(3)
    rewards_N = torch.randn(37, generator=g, dtype=DT)
    bounds = [0, 1, 1, 9, 20, 20, 21, 37]  # includes empty sequences and a 1-token one
    gamma = 0.9
    expected = torch.zeros_like(rewards_N)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        for t in range(start, end):
            expected[t] = sum(gamma ** (u - t) * rewards_N[u] for u in range(t, end))
    got = discounted_advantages(rewards_N, torch.tensor(bounds), gamma)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="gamma"):
        discounted_advantages(rewards_N, torch.tensor(bounds), 1.5)


# --------------------------------------------------------------------------------------------
# sampled_token_loss
# --------------------------------------------------------------------------------------------


def test_sampled_token_loss_and_grad_match_hand_computation() -> None:
    c, w_N = Case(1), _weights()
    old_N = c.old_logp_NV[torch.arange(N), c.sampled_N]
    teacher_N = c.teacher_logp_NV[torch.arange(N), c.sampled_N]

    def module(x: Tensor) -> Tensor:
        logp_N = torch.log_softmax(x, -1)[torch.arange(N), c.sampled_N]
        return sampled_token_loss(logp_N, old_N, teacher_N)

    def reference(x: Tensor) -> Tensor:
        out = []
        for t in range(N):
            y = int(c.sampled_N[t])
            logp = _log_softmax_row(x[t])[y]
            advantage = float(teacher_N[t] - old_N[t])  # a constant by construction
            out.append(-torch.exp(logp - old_N[t]) * advantage)
        return torch.stack(out)

    loss, grad = _grad(module, c.logits_NV, w_N)
    ref_loss, ref_grad = _grad(reference, c.logits_NV, w_N)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_sampled_token_on_policy_gradient_is_minus_advantage_times_grad_logp() -> None:
    c, w_N = Case(2), _weights()
    logp_NV = torch.log_softmax(c.logits_NV, -1)
    old_N = logp_NV[torch.arange(N), c.sampled_N]  # on-policy: old == current
    teacher_N = c.teacher_logp_NV[torch.arange(N), c.sampled_N]
    adv_N = torch.tensor([0.3, -1.2, 0.0, 2.0, -0.4], dtype=DT)

    for advantages in (None, adv_N):

        def module(x: Tensor, advantages: Tensor | None = advantages) -> Tensor:
            logp_N = torch.log_softmax(x, -1)[torch.arange(N), c.sampled_N]
            return sampled_token_loss(logp_N, old_N, teacher_N, advantages_N=advantages)

        _, grad = _grad(module, c.logits_NV, w_N)
        a_N = teacher_N - old_N if advantages is None else advantages
        # d log p(y)/d z = onehot(y) - softmax(z), so grad_t = -w_t A_t (onehot - p).
        expected = torch.zeros(N, V, dtype=DT)
        for t in range(N):
            onehot = torch.zeros(V, dtype=DT)
            onehot[c.sampled_N[t]] = 1.0
            expected[t] = -w_N[t] * a_N[t] * (onehot - torch.softmax(c.logits_NV[t], -1))
        torch.testing.assert_close(grad, expected)


def test_sampled_token_advantages_are_constants_even_when_they_carry_grad() -> None:
    """An advantage built from the current log p (a careless caller) must not add gradient."""
    c = Case(15)
    teacher_N = c.teacher_logp_NV[torch.arange(N), c.sampled_N]
    x = c.logits_NV.clone().requires_grad_(True)
    logp_N = torch.log_softmax(x, -1)[torch.arange(N), c.sampled_N]
    adv_N = teacher_N - logp_N  # depends on x
    loss_N = sampled_token_loss(logp_N, logp_N.detach(), teacher_N, advantages_N=adv_N)
    (grad,) = torch.autograd.grad(loss_N.sum(), x)
    expected = torch.zeros(N, V, dtype=DT)
    for t in range(N):
        onehot = torch.zeros(V, dtype=DT)
        onehot[c.sampled_N[t]] = 1.0
        a = float(teacher_N[t] - logp_N[t].detach())
        expected[t] = -a * (onehot - torch.softmax(c.logits_NV[t], -1))
    torch.testing.assert_close(grad, expected)


def test_sampled_token_ppo_clip_zeroes_only_the_clipped_tokens() -> None:
    eps = 0.2
    old_N = torch.zeros(4, dtype=DT)
    # ratios 1.5, 0.5, 1.5, 1.05 with advantages +, -, -, +:
    # tokens 0 and 1 are clipped (ratio moved past the clip in A's direction), 2 and 3 are not.
    logp0_N = torch.log(torch.tensor([1.5, 0.5, 1.5, 1.05], dtype=DT))
    teacher_N = torch.tensor([0.7, -0.9, -0.6, 0.8], dtype=DT)  # A = teacher - old

    def grad_of(clip_eps: float | None) -> Tensor:
        logp_N = logp0_N.clone().requires_grad_(True)
        loss_N = sampled_token_loss(logp_N, old_N, teacher_N, clip_eps=clip_eps)
        (g,) = torch.autograd.grad(loss_N.sum(), logp_N)
        return g

    clipped, plain = grad_of(eps), grad_of(None)
    torch.testing.assert_close(plain, -torch.exp(logp0_N) * teacher_N)  # d(-rho A)/d logp
    torch.testing.assert_close(clipped[:2], torch.zeros(2, dtype=DT))
    torch.testing.assert_close(clipped[2:], plain[2:])
    assert bool((plain[:2] != 0).all())
    # The clipped value is -clip(rho) A where clipping is active.
    logp_N = logp0_N.clone()
    got = sampled_token_loss(logp_N, old_N, teacher_N, clip_eps=eps)
    torch.testing.assert_close(got[:2], -torch.tensor([1.2, 0.8], dtype=DT) * teacher_N[:2])


# --------------------------------------------------------------------------------------------
# student_topk_loss
# --------------------------------------------------------------------------------------------


def _student_topk_reference(c: Case, variant: str) -> Callable[[Tensor], Tensor]:
    def reference(x: Tensor) -> Tensor:
        out = []
        for t in range(N):
            logp_V = _log_softmax_row(x[t])
            ids = [int(i) for i in c.cand_ids_NK[t]]
            old = [float(c.old_logp_NV[t, v]) for v in ids]
            tq = [float(c.teacher_logp_NV[t, v]) for v in ids]
            if variant == "released":
                z_old = sum(math.exp(o) for o in old)
                loss = x.new_zeros(())
                for j, v in enumerate(ids):
                    advantage = math.exp(old[j]) / z_old * (tq[j] - old[j])
                    loss = loss - torch.exp(logp_V[v] - old[j]) * advantage
            else:
                z_p = sum(torch.exp(logp_V[v]) for v in ids)
                z_q = sum(math.exp(a) for a in tq)
                loss = x.new_zeros(())
                for j, v in enumerate(ids):
                    pbar = torch.exp(logp_V[v]) / z_p
                    qbar = math.exp(tq[j]) / z_q
                    loss = loss + pbar * (torch.log(pbar) - math.log(qbar))
            out.append(loss)
        return torch.stack(out)

    return reference


@pytest.mark.parametrize("variant", ["released", "renormalized"])
def test_student_topk_loss_and_grad_match_hand_computation(variant: str) -> None:
    c, w_N = Case(3), _weights()
    old_NK = c.old_logp_NV.gather(-1, c.cand_ids_NK)
    teacher_NK = c.teacher_logp_NV.gather(-1, c.cand_ids_NK)

    def module(x: Tensor) -> Tensor:
        return student_topk_loss(
            torch.log_softmax(x, -1), c.cand_ids_NK, old_NK, teacher_NK, variant=variant
        )

    loss, grad = _grad(module, c.logits_NV, w_N)
    ref_loss, ref_grad = _grad(_student_topk_reference(c, variant), c.logits_NV, w_N)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    if variant == "renormalized":
        assert bool((loss >= -1e-12).all())  # a KL between two distributions on S_t


def test_student_topk_released_on_policy_gradient() -> None:
    c, w_N = Case(4), _weights()
    logp_NV = torch.log_softmax(c.logits_NV, -1)
    old_NK = logp_NV.gather(-1, c.cand_ids_NK)  # on-policy
    teacher_NK = c.teacher_logp_NV.gather(-1, c.cand_ids_NK)

    def module(x: Tensor) -> Tensor:
        return student_topk_loss(torch.log_softmax(x, -1), c.cand_ids_NK, old_NK, teacher_NK)

    _, grad = _grad(module, c.logits_NV, w_N)
    expected = torch.zeros(N, V, dtype=DT)
    for t in range(N):
        p_V = torch.softmax(c.logits_NV[t], -1)
        z = sum(float(p_V[v]) for v in c.cand_ids_NK[t])
        for j, v in enumerate(c.cand_ids_NK[t]):
            advantage = float(p_V[v]) / z * float(teacher_NK[t, j] - old_NK[t, j])
            onehot = torch.zeros(V, dtype=DT)
            onehot[v] = 1.0
            expected[t] -= w_N[t] * advantage * (onehot - p_V)
    torch.testing.assert_close(grad, expected)


def test_student_topk_released_ppo_clip_per_candidate() -> None:
    eps = 0.2
    ids_NK = torch.tensor([[0, 1, 2, 3]])
    old_NK = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=DT))
    teacher_NK = old_NK + torch.tensor([[0.5, -0.5, 0.5, -0.5]], dtype=DT)  # sign of A(v)
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.9]], dtype=DT)  # v0, v1 clipped; v2, v3 inside
    logp0_NV = torch.full((1, 6), -5.0, dtype=DT)
    logp0_NV[0, :4] = old_NK[0] + torch.log(ratios[0])

    def grad_of(clip_eps: float | None) -> Tensor:
        logp_NV = logp0_NV.clone().requires_grad_(True)
        loss_N = student_topk_loss(logp_NV, ids_NK, old_NK, teacher_NK, clip_eps=clip_eps)
        (g,) = torch.autograd.grad(loss_N.sum(), logp_NV)
        return g

    clipped, plain = grad_of(eps), grad_of(None)
    torch.testing.assert_close(clipped[0, :2], torch.zeros(2, dtype=DT))
    torch.testing.assert_close(clipped[0, 2:], plain[0, 2:])
    assert bool((plain[0, :4] != 0).all())
    assert bool((plain[0, 4:] == 0).all())  # non-candidates never get a gradient


# --------------------------------------------------------------------------------------------
# teacher top-k: forward KL and JSD
# --------------------------------------------------------------------------------------------


def _teacher_topk_reference(c: Case, kind: str, tail: bool, beta: float = 0.5):
    def reference(x: Tensor) -> Tensor:
        out = []
        for t in range(N):
            logp_V = _log_softmax_row(x[t])
            ids = [int(i) for i in c.teacher_ids_Nk[t]]
            p = [torch.exp(logp_V[v]) for v in ids]
            q = [math.exp(float(c.teacher_logp_NV[t, v])) for v in ids]
            if tail:
                p.append(1.0 - sum(p))
                q.append(1.0 - sum(q))
            if kind == "fkl":
                out.append(
                    sum(qi * (math.log(qi) - torch.log(pi)) for pi, qi in zip(p, q, strict=True))
                )
                continue
            if not tail:  # JSD over the k ids renormalised
                zp, zq = sum(p), sum(q)
                p, q = [pi / zp for pi in p], [qi / zq for qi in q]
            m = [beta * qi + (1 - beta) * pi for pi, qi in zip(p, q, strict=True)]
            kl_qm = sum(qi * (math.log(qi) - torch.log(mi)) for qi, mi in zip(q, m, strict=True))
            kl_pm = sum(pi * (torch.log(pi) - torch.log(mi)) for pi, mi in zip(p, m, strict=True))
            out.append(beta * kl_qm + (1 - beta) * kl_pm)
        return torch.stack(out)

    return reference


@pytest.mark.parametrize("tail", [True, False])
def test_teacher_topk_forward_kl_matches_hand_computation(tail: bool) -> None:
    c, w_N = Case(5), _weights()
    teacher_Nk = c.teacher_logp_NV.gather(-1, c.teacher_ids_Nk)

    def module(x: Tensor) -> Tensor:
        logp_NV = torch.log_softmax(x, -1)
        return teacher_topk_forward_kl(logp_NV, c.teacher_ids_Nk, teacher_Nk, tail=tail)

    loss, grad = _grad(module, c.logits_NV, w_N)
    ref_loss, ref_grad = _grad(_teacher_topk_reference(c, "fkl", tail), c.logits_NV, w_N)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_forward_kl_with_full_top_k_equals_full_vocabulary_kl() -> None:
    c = Case(6, k_teacher=V)  # k = V: the tail is empty
    teacher_NV = c.teacher_logp_NV.gather(-1, c.teacher_ids_Nk)
    w_N = _weights()

    def module(x: Tensor) -> Tensor:
        logp_NV = torch.log_softmax(x, -1)
        return teacher_topk_forward_kl(logp_NV, c.teacher_ids_Nk, teacher_NV, tail=True)

    def full_kl(x: Tensor) -> Tensor:
        rows = []
        for t in range(N):
            logp_V, logq_V = _log_softmax_row(x[t]), c.teacher_logp_NV[t]
            rows.append((logq_V.exp() * (logq_V - logp_V)).sum())
        return torch.stack(rows)

    loss, grad = _grad(module, c.logits_NV, w_N)
    ref_loss, ref_grad = _grad(full_kl, c.logits_NV, w_N)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_kl_with_tail_is_nonnegative_on_random_inputs(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(11)
    for k in (1, 2, 5, 10, 31, 32):
        for scale in (0.1, 1.0, 6.0):
            logp_NV = torch.log_softmax(torch.randn(64, 32, generator=g) * scale, -1).to(dtype)
            logq_NV = torch.log_softmax(torch.randn(64, 32, generator=g) * scale, -1).to(dtype)
            ids_Nk = logq_NV.topk(k, dim=-1).indices
            loss_N = teacher_topk_forward_kl(logp_NV, ids_Nk, logq_NV.gather(-1, ids_Nk))
            assert bool(torch.isfinite(loss_N).all())
            assert float(loss_N.min()) >= -1e-6, (k, scale)
            # the JSD over the same k + 1 outcomes is a divergence too
            jsd_N = teacher_topk_jsd(logp_NV, ids_Nk, logq_NV.gather(-1, ids_Nk))
            assert float(jsd_N.min()) >= -1e-6, (k, scale)


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("beta", [0.5, 0.1, 0.9])
def test_teacher_topk_jsd_matches_hand_computation(beta: float, tail: bool) -> None:
    c, w_N = Case(8), _weights()
    teacher_Nk = c.teacher_logp_NV.gather(-1, c.teacher_ids_Nk)

    def module(x: Tensor) -> Tensor:
        logp_NV = torch.log_softmax(x, -1)
        return teacher_topk_jsd(logp_NV, c.teacher_ids_Nk, teacher_Nk, beta=beta, tail=tail)

    loss, grad = _grad(module, c.logits_NV, w_N)
    ref = _teacher_topk_reference(c, "jsd", tail, beta)
    ref_loss, ref_grad = _grad(ref, c.logits_NV, w_N)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_teacher_topk_jsd_endpoints_are_forward_and_reverse_kl() -> None:
    c, w_N = Case(9), _weights()
    teacher_Nk = c.teacher_logp_NV.gather(-1, c.teacher_ids_Nk)

    def jsd(beta: float) -> Callable[[Tensor], Tensor]:
        return lambda x: teacher_topk_jsd(
            torch.log_softmax(x, -1), c.teacher_ids_Nk, teacher_Nk, beta=beta
        )

    def fkl(x: Tensor) -> Tensor:
        return teacher_topk_forward_kl(torch.log_softmax(x, -1), c.teacher_ids_Nk, teacher_Nk)

    def rkl(x: Tensor) -> Tensor:  # KL(p || q) over the k ids + tail, by hand
        rows = []
        for t in range(N):
            logp_V = _log_softmax_row(x[t])
            p = [torch.exp(logp_V[v]) for v in c.teacher_ids_Nk[t]]
            q = [math.exp(float(a)) for a in teacher_Nk[t]]
            p.append(1.0 - sum(p))
            q.append(1.0 - sum(q))
            rows.append(
                sum(pi * (torch.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
            )
        return torch.stack(rows)

    for got, want in ((jsd(0.0), fkl), (jsd(1.0), rkl)):
        loss, grad = _grad(got, c.logits_NV, w_N)
        ref_loss, ref_grad = _grad(want, c.logits_NV, w_N)
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(grad, ref_grad)
    with pytest.raises(ValueError, match="beta"):
        jsd(1.5)(c.logits_NV)


def test_teacher_topk_jsd_follows_trl_convention_on_the_full_vocabulary() -> None:
    """k = V, no tail: identical to TRL GKDTrainer.generalized_jsd_loss (per token).

    TRL: log m = logsumexp(log p + log(1 - beta), log q + log beta);
         jsd = beta * kl_div(log m, log q) + (1 - beta) * kl_div(log m, log p),
    i.e. beta weights the teacher q, both in the mixture and in front of KL(q || m).
    """
    c = Case(10, k_teacher=V)
    beta = 0.3
    logp_NV = torch.log_softmax(c.logits_NV, -1)
    logq_NV = c.teacher_logp_NV
    b = torch.tensor(beta, dtype=DT)
    logm_NV = torch.logsumexp(torch.stack([logp_NV + torch.log(1 - b), logq_NV + torch.log(b)]), 0)
    kl_teacher = F.kl_div(logm_NV, logq_NV, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(logm_NV, logp_NV, reduction="none", log_target=True).sum(-1)
    trl_N = beta * kl_teacher + (1 - beta) * kl_student
    got = teacher_topk_jsd(
        logp_NV, c.teacher_ids_Nk, logq_NV.gather(-1, c.teacher_ids_Nk), beta=beta, tail=False
    )
    torch.testing.assert_close(got, trl_N)


# --------------------------------------------------------------------------------------------
# overlap_topk_loss
# --------------------------------------------------------------------------------------------


def _overlap_reference(c: Case, teacher_ids_Nk: Tensor) -> Callable[[Tensor], Tensor]:
    def reference(x: Tensor) -> Tensor:
        out = []
        for t in range(N):
            logp_V = _log_softmax_row(x[t])
            teacher_set = {int(v) for v in teacher_ids_Nk[t]}
            inter = [int(v) for v in c.cand_ids_NK[t] if int(v) in teacher_set]
            z = sum(math.exp(float(c.old_logp_NV[t, v])) for v in inter)
            loss = x.new_zeros(())
            for v in inter:
                old, tq = float(c.old_logp_NV[t, v]), float(c.teacher_logp_NV[t, v])
                advantage = math.exp(old) / z * (tq - old)
                loss = loss - torch.exp(logp_V[v] - old) * advantage
            out.append(loss)
        return torch.stack(out)

    return reference


def _overlap_module(c: Case, teacher_ids_Nk: Tensor, clip_eps: float | None = None):
    old_NK = c.old_logp_NV.gather(-1, c.cand_ids_NK)
    teacher_NK = c.teacher_logp_NV.gather(-1, c.cand_ids_NK)
    return lambda x: overlap_topk_loss(
        torch.log_softmax(x, -1),
        c.cand_ids_NK,
        old_NK,
        teacher_NK,
        teacher_ids_Nk,
        clip_eps=clip_eps,
    )


def test_overlap_topk_matches_hand_computation() -> None:
    c, w_N = Case(12), _weights()
    # Teacher ids: row 0 shares two candidates, row 1 one, row 2 all three from the teacher's
    # own top-k, row 3 none, row 4 the student's top-1 only.
    teacher_ids_Nk = c.teacher_ids_Nk.clone()
    teacher_ids_Nk[0, :2] = c.cand_ids_NK[0, [1, 3]]
    teacher_ids_Nk[1, 0] = c.cand_ids_NK[1, 2]
    teacher_ids_Nk[4] = c.cand_ids_NK[4, 0]
    s_all = set(range(V)) - {int(v) for v in c.cand_ids_NK[3]}
    teacher_ids_Nk[3] = torch.tensor(sorted(s_all)[:KT])
    loss, grad = _grad(_overlap_module(c, teacher_ids_Nk), c.logits_NV, w_N)
    ref_loss, ref_grad = _grad(_overlap_reference(c, teacher_ids_Nk), c.logits_NV, w_N)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    assert float(loss[3]) == 0.0 and bool((grad[3] == 0).all())


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_overlap_topk_with_no_shared_ids_gives_zero_loss_and_grad(clip_eps: float | None) -> None:
    c, w_N = Case(13), _weights()
    disjoint = torch.stack(
        [
            torch.tensor(sorted(set(range(V)) - {int(v) for v in c.cand_ids_NK[t]})[:KT])
            for t in range(N)
        ]
    )
    loss, grad = _grad(_overlap_module(c, disjoint, clip_eps), c.logits_NV, w_N)
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())
    torch.testing.assert_close(loss, torch.zeros(N, dtype=DT), atol=0.0, rtol=0.0)
    torch.testing.assert_close(grad, torch.zeros(N, V, dtype=DT), atol=0.0, rtol=0.0)


def test_overlap_topk_equals_student_topk_when_teacher_covers_candidates() -> None:
    c = Case(14)
    old_NK = c.old_logp_NV.gather(-1, c.cand_ids_NK)
    teacher_NK = c.teacher_logp_NV.gather(-1, c.cand_ids_NK)
    logp_NV = torch.log_softmax(c.logits_NV, -1)
    covering = torch.cat([c.cand_ids_NK.flip(-1), c.teacher_ids_Nk], dim=-1)
    got = overlap_topk_loss(logp_NV, c.cand_ids_NK, old_NK, teacher_NK, covering, clip_eps=0.2)
    want = student_topk_loss(logp_NV, c.cand_ids_NK, old_NK, teacher_NK, clip_eps=0.2)
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------
# The canary: student == teacher
# --------------------------------------------------------------------------------------------


def test_student_equal_to_teacher_gives_zero_loss_zero_grad_and_full_overlap() -> None:
    g = torch.Generator().manual_seed(21)
    logits_NV = torch.randn(N, V, generator=g, dtype=DT) * 2.0
    logq_NV = torch.log_softmax(logits_NV, -1)  # the teacher *is* the student
    sampled_N = torch.multinomial(logq_NV.exp(), 1, generator=g).squeeze(-1)
    rows = torch.arange(N)
    k = K  # same k on both sides so the overlap ratio can be 1
    cand_NK = logq_NV.topk(K, -1).indices
    teacher_ids_Nk = logq_NV.topk(k, -1).indices
    old_NK = logq_NV.gather(-1, cand_NK)
    tq_Nk = logq_NV.gather(-1, teacher_ids_Nk)

    overlap_N = (cand_NK.unsqueeze(-1) == teacher_ids_Nk.unsqueeze(-2)).any(-1).sum(-1) / k
    torch.testing.assert_close(overlap_N, torch.ones(N))

    losses: dict[str, Callable[[Tensor], Tensor]] = {
        "sampled": lambda lp: sampled_token_loss(
            lp[rows, sampled_N], logq_NV[rows, sampled_N], logq_NV[rows, sampled_N]
        ),
        "sampled-clipped-discounted": lambda lp: sampled_token_loss(
            lp[rows, sampled_N],
            logq_NV[rows, sampled_N],
            logq_NV[rows, sampled_N],
            advantages_N=discounted_advantages(
                logq_NV[rows, sampled_N] - logq_NV[rows, sampled_N], torch.tensor([0, 2, N]), 0.9
            ),
            clip_eps=0.2,
        ),
        "student-topk": lambda lp: student_topk_loss(lp, cand_NK, old_NK, old_NK),
        "student-topk-clipped": lambda lp: student_topk_loss(
            lp, cand_NK, old_NK, old_NK, clip_eps=0.2
        ),
        "student-topk-renormalized": lambda lp: student_topk_loss(
            lp, cand_NK, old_NK, old_NK, variant="renormalized"
        ),
        "teacher-topk": lambda lp: teacher_topk_forward_kl(lp, teacher_ids_Nk, tq_Nk),
        "teacher-topk-no-tail": lambda lp: teacher_topk_forward_kl(
            lp, teacher_ids_Nk, tq_Nk, tail=False
        ),
        "jsd": lambda lp: teacher_topk_jsd(lp, teacher_ids_Nk, tq_Nk),
        "jsd-no-tail": lambda lp: teacher_topk_jsd(lp, teacher_ids_Nk, tq_Nk, tail=False),
        "jsd-beta0": lambda lp: teacher_topk_jsd(lp, teacher_ids_Nk, tq_Nk, beta=0.0),
        "jsd-beta1": lambda lp: teacher_topk_jsd(lp, teacher_ids_Nk, tq_Nk, beta=1.0),
        "overlap-topk": lambda lp: overlap_topk_loss(lp, cand_NK, old_NK, old_NK, teacher_ids_Nk),
    }
    for name, fn in losses.items():
        x = logits_NV.clone().requires_grad_(True)
        loss_N = fn(torch.log_softmax(x, -1))
        (grad,) = torch.autograd.grad(loss_N.sum(), x)
        assert loss_N.shape == (N,), name
        # tail=False forward KL is a restricted sum of q log(q/p) = 0 termwise, its gradient
        # -sum_T q (onehot - p) is not zero: p == q is not a stationary point of it.
        expect_zero_grad = name != "teacher-topk-no-tail"
        torch.testing.assert_close(loss_N, torch.zeros(N, dtype=DT), atol=1e-12, rtol=0, msg=name)
        if expect_zero_grad:
            torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-12, rtol=0, msg=name)


# --------------------------------------------------------------------------------------------
# Config and module hygiene
# --------------------------------------------------------------------------------------------


def test_objective_config_defaults_validate_and_flags() -> None:
    flags = {
        name: (
            needs_teacher_topk(ObjectiveConfig(name=name)),
            needs_candidates(ObjectiveConfig(name=name)),
        )
        for name in OBJECTIVES
    }
    assert flags == {
        "sampled": (False, False),
        "student-topk": (False, True),
        "teacher-topk": (True, False),
        "jsd": (True, False),
        "overlap-topk": (True, True),
    }
    for ok in (
        ObjectiveConfig(name="sampled", discount=0.99, clip_eps=0.2),
        ObjectiveConfig(name="jsd", jsd_beta=0.0, tail=False),
        ObjectiveConfig(name="jsd", jsd_beta=1.0),
        ObjectiveConfig(name="overlap-topk", clip_eps=0.2),
        ObjectiveConfig(topk_variant="renormalized"),
    ):
        assert ObjectiveConfig.model_validate(ok.model_dump()) == ok
    with pytest.raises(ValidationError, match="frozen"):
        ObjectiveConfig().name = "jsd"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "full-vocab"}, "name"),
        ({"topk_variant": "paper"}, "topk_variant"),
        ({"name": "sampled", "discount": -0.1}, "discount"),
        ({"name": "sampled", "discount": 1.5}, "discount"),
        ({"name": "student-topk", "discount": 0.9}, "discount"),
        ({"clip_eps": 0.0}, "clip_eps"),
        ({"clip_eps": 1.0}, "clip_eps"),
        ({"name": "jsd", "clip_eps": 0.2}, "clip_eps"),
        ({"topk_variant": "renormalized", "clip_eps": 0.2}, "clip_eps"),
        ({"tail": "maybe"}, "tail"),
        ({"jsd_beta": -0.01}, "jsd_beta"),
        ({"jsd_beta": 1.01}, "jsd_beta"),
    ],
)
def test_objective_config_validate_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ObjectiveConfig(**kwargs)  # type: ignore[arg-type]
    (error,) = caught.value.errors()
    # a bound on the field itself (loc), or a rule across knobs that names it first
    assert error["loc"] == (field,) or error["msg"].startswith(f"Value error, {field}:")


def test_loss_path_never_syncs_to_host() -> None:
    """No host round-trips in the module's code (docstrings may mention them)."""
    tree = ast.parse(inspect.getsource(objectives))
    called = {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not called & {"item", "numpy", "tolist", "cpu"}, called
    assert "numpy" not in imported
