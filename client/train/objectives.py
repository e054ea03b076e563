r"""The OPD objectives as pure functions: per-token losses a trainer sums and divides itself.

Notation (shape suffixes, used on every tensor below):

    N  scored completion positions of a micro-batch, flattened over its sequences (one row each)
    V  vocabulary size
    K  student top-k candidates per position (paper default 16)
    k  teacher top-k ids per position
    n  sequences; seq_offsets has n + 1 entries and sequence i owns rows [off[i], off[i+1])

    p      the current student, p_t(v) = exp(logp_NV[t, v])     (carries the gradient)
    p_old  the student at rollout time                          (constant, `old_` prefix)
    q      the teacher, as scored by the service                (constant)

Every function returns a per-token loss of shape [N]. The trainer does the token-mean itself
(sum over tokens / number of tokens in the whole optimizer step) so that gradient accumulation
over micro-batches stays exact. Nothing here calls .item() or leaves the device.

The objectives (reverse KL per position, KL(p_t || q_t), estimated in different ways):

    sampled (Tinker):       r_t   = log q(y_t) - log p_old(y_t)            (-(per-token rev. KL))
                            A_t   = r_t, or sum_{t'>=t} gamma^(t'-t) r_t'   (constant)
                            rho_t = exp(log p(y_t) - log p_old(y_t))
                            l_t   = -rho_t * A_t
                                  | -min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t)   (PPO clip)

    student-topk, released  S_t = TopK(p_old_t, K)
    (thunlp/OPD code):      p_bar_old(v) = p_old(v) / sum_{u in S_t} p_old(u)
                            A_t(v) = p_bar_old(v) * (log q(v) - log p_old(v))   (constant)
                            l_t    = -sum_{v in S_t} rho_t(v) A_t(v)   (or PPO min/clip per v)

    student-topk,           p_bar = softmax_{S_t}(log p),  q_bar = softmax_{S_t}(log q)
    renormalized (paper):   l_t   = sum_{v in S_t} p_bar(v) (log p_bar(v) - log q_bar(v))

    teacher-topk            T_t = TopK(q_t, k)
    (forward KL):           l_t = sum_{v in T_t} q(v) (log q(v) - log p(v))
                                  + q_tail (log q_tail - log p_tail)      (if tail)
                            q_tail = 1 - sum_{T_t} q,  p_tail = 1 - sum_{T_t} p

    jsd (GKD / TRL):        over the k (+1 tail) outcomes, m = beta q + (1 - beta) p
                            l_t = beta KL(q || m) + (1 - beta) KL(p || m)
                            beta = 0: KL(q || p);  beta = 1: KL(p || q)

    overlap-topk:           I_t = S_t intersect T_t; the released student-topk loss with
                            p_bar_old renormalised over I_t only; l_t = 0 where I_t is empty.

In the policy-gradient forms the loss value is a surrogate: at rho = 1 its gradient is
-A * grad log p, which is what the method prescribes; the value itself is not a KL.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from opd.client.configs.groups import OBJECTIVE_KNOBS, TOPK_VARIANTS, ObjectiveConfig
from opd.client.configs.groups import OBJECTIVES as CONFIG_OBJECTIVES

if TYPE_CHECKING:
    from opd.client.train.positions import TokenBatch

__all__ = [
    "OBJECTIVES",
    "REGISTRY",
    "Objective",
    "objective",
    "per_token_loss",
    "TOPK_VARIANTS",
    "ObjectiveConfig",
    "discounted_advantages",
    "needs_candidates",
    "needs_teacher_topk",
    "overlap_topk_loss",
    "sampled_token_loss",
    "student_topk_loss",
    "teacher_topk_forward_kl",
    "teacher_topk_jsd",
]

# Largest log-mass a top-k set may claim before its tail is computed: keeps
# log(1 - sum) finite when the top-k covers (numerically) all of the mass. The same bound
# as TRL's `_add_tail_bucket`; a tail clamped here contributes ~1e-7 nats and no gradient.
_MAX_TOPK_LOG_MASS = -1e-7


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _policy_gradient(log_ratio: Tensor, advantages: Tensor, clip_eps: float | None) -> Tensor:
    """Elementwise PPO surrogate, the one policy-gradient form every sampled objective shares.

    rho = exp(log_ratio);  l = -rho A                                    (clip_eps None)
                           l = max(-rho A, -clip(rho, 1-eps, 1+eps) A)   (= -min(...), PPO)

    With clipping, a token whose ratio has left [1-eps, 1+eps] in the direction its advantage
    pushes gets no gradient, so stale rollouts cannot drag the policy arbitrarily far.
    """
    ratio = torch.exp(log_ratio)
    loss = -ratio * advantages
    if clip_eps is None:
        return loss
    clipped = -torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return torch.maximum(loss, clipped)


def _log_tail(logp_Nk: Tensor) -> Tensor:
    """log(1 - sum_k exp(logp_Nk)) per row, stable when the top-k mass is close to 1.

    log1p(-exp(s)) = log(-expm1(s)) with s = logsumexp(logp) clamped just below 0.
    """
    log_mass_N1 = torch.logsumexp(logp_Nk, dim=-1, keepdim=True).clamp(max=_MAX_TOPK_LOG_MASS)
    return torch.log(-torch.expm1(log_mass_N1))


def _with_tail(logp_Nk: Tensor) -> Tensor:
    """Append the tail bucket, making k log-probs a distribution over k + 1 outcomes."""
    return torch.cat([logp_Nk, _log_tail(logp_Nk)], dim=-1)


def _kl_rows(log_a_NM: Tensor, log_b_NM: Tensor) -> Tensor:
    """sum_m a(m) (log a(m) - log b(m)) per row: KL(a || b) when both are distributions."""
    return (log_a_NM.exp() * (log_a_NM - log_b_NM)).sum(dim=-1)


def _usable(valid_NK: Tensor) -> tuple[Tensor, Tensor]:
    """(valid entries, rows with any), where a row with none counts every entry as valid: its
    numbers are placeholders and its loss is zeroed afterwards (`any_N`), and computing it on
    finite placeholders keeps NaN out of the gradient (a softmax over an all -inf row, or
    0 * inf in a where's unselected branch, would put NaN there)."""
    any_N1 = valid_NK.any(dim=-1, keepdim=True)
    return valid_NK | ~any_N1, any_N1[:, 0]


def _equalised(log_a_NM: Tensor, log_b_NM: Tensor, valid_NM: Tensor) -> tuple[Tensor, Tensor]:
    """Both log-prob rows with their invalid entries set to one shared finite value, so each
    such entry's KL term a (log a - log b) is exactly 0 and carries no gradient."""
    zero = torch.zeros((), dtype=log_a_NM.dtype, device=log_a_NM.device)
    return torch.where(valid_NM, log_a_NM, zero), torch.where(valid_NM, log_b_NM, zero)


def _support(logp_Nk: Tensor, logq_Nk: Tensor, valid_Nk: Tensor | None, tail: bool):
    """The outcomes both distributions are compared on: the k ids (+ the tail bucket). With
    `valid_Nk` (a teacher of another tokenizer: ids that map to the student's vocabulary) only
    the valid ids are outcomes, and the mass of the others falls into the tail on both sides.
    Returns (log p, log q, valid outcomes or None, rows with any valid id or None); without
    a tail the k ids are renormalised over the valid ones."""
    if valid_Nk is None:
        if tail:
            return _with_tail(logp_Nk), _with_tail(logq_Nk), None, None
        return torch.log_softmax(logp_Nk, -1), torch.log_softmax(logq_Nk, -1), None, None
    valid_Nk, any_N = _usable(valid_Nk)
    ninf = torch.full_like(logp_Nk, float("-inf"))
    masked_p, masked_q = torch.where(valid_Nk, logp_Nk, ninf), torch.where(valid_Nk, logq_Nk, ninf)
    if tail:
        log_p = torch.cat([logp_Nk, _log_tail(masked_p)], dim=-1)
        log_q = torch.cat([logq_Nk, _log_tail(masked_q)], dim=-1)
        ones = torch.ones_like(valid_Nk[:, :1])
        valid_NM = torch.cat([valid_Nk, ones], dim=-1)
    else:
        log_p, log_q = torch.log_softmax(masked_p, -1), torch.log_softmax(masked_q, -1)
        valid_NM = valid_Nk
    log_p, log_q = _equalised(log_p, log_q, valid_NM)
    return log_p, log_q, valid_NM, any_N


def _where_rows(any_N: Tensor | None, loss_N: Tensor) -> Tensor:
    """The loss where a row had any teacher number, 0 on rows of placeholders only."""
    return loss_N if any_N is None else torch.where(any_N, loss_N, torch.zeros_like(loss_N))


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def discounted_advantages(rewards_N: Tensor, seq_offsets: Tensor, gamma: float) -> Tensor:
    """Per-sequence return-to-go: A_t = sum_{t' >= t, same sequence} gamma^(t'-t) r_t'.

    gamma = 0 (the default) is Tinker's "no discount": every token is credited only with its
    own reward, A_t = r_t, and `rewards_N` is returned as is. gamma > 0 also credits a token
    with the (discounted) KL the student incurs later in its own sequence.

    Why a doubling scan: the recurrence A_t = r_t + c_t A_{t+1} (c_t = gamma inside a
    sequence, 0 at its last row) is solved in ceil(log2 N) vectorised steps, using only
    products of gammas (<= 1, so no overflow, unlike rescaling by gamma^-t), without a Python
    loop over tokens and without reading seq_offsets back to the host.

    seq_offsets: int64 [n + 1], non-decreasing, seq_offsets[0] = 0 and seq_offsets[-1] = N.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if gamma == 0.0:
        return rewards_N
    rewards_N = rewards_N.detach()
    n_rows = rewards_N.shape[0]
    rows_N = torch.arange(n_rows, device=rewards_N.device)
    offsets = seq_offsets.to(device=rewards_N.device, dtype=torch.int64)
    seq_id_N = torch.searchsorted(offsets, rows_N, right=True) - 1
    # c_t = gamma where row t + 1 belongs to the same sequence, else 0 (incl. the last row).
    same_next_N = torch.zeros(n_rows, dtype=torch.bool, device=rewards_N.device)
    same_next_N[:-1] = seq_id_N[1:] == seq_id_N[:-1]
    coef_N = same_next_N.to(rewards_N.dtype) * gamma
    adv_N = rewards_N.clone()
    # Invariant after stride s: adv_t sums s terms starting at t; coef_t = prod of their c's.
    stride = 1
    while stride < n_rows:
        shifted_adv_N = torch.zeros_like(adv_N)
        shifted_adv_N[:-stride] = adv_N[stride:]
        shifted_coef_N = torch.zeros_like(coef_N)
        shifted_coef_N[:-stride] = coef_N[stride:]
        adv_N = adv_N + coef_N * shifted_adv_N
        coef_N = coef_N * shifted_coef_N
        stride *= 2
    return adv_N


# --------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------


def sampled_token_loss(
    logp_N: Tensor,
    old_logp_N: Tensor,
    teacher_logp_N: Tensor,
    *,
    advantages_N: Tensor | None = None,
    clip_eps: float | None = None,
) -> Tensor:
    """Sampled-token objective (Tinker style): the cheapest estimator, one teacher number a token.

    r_t = log q(y_t) - log p_old(y_t), an unbiased estimate of -KL(p_t || q_t) because y_t was
    sampled from p_old; A_t = r_t unless `advantages_N` is given (e.g. discounted_advantages).
    A_t is a constant (detached): the teacher's opinion is the reward, not something to move.

    l_t = -rho_t A_t with rho_t = exp(log p(y_t) - log p_old(y_t)); on-policy (rho = 1) the
    gradient is -A_t grad log p(y_t). clip_eps gives PPO's -min(rho A, clip(rho) A), only
    relevant when rollouts are stale (several optimizer steps per batch).

    logp_N is the current log p of the sampled token (with grad); the rest are constants.
    """
    if advantages_N is None:
        advantages_N = teacher_logp_N - old_logp_N
    return _policy_gradient(logp_N - old_logp_N.detach(), advantages_N.detach(), clip_eps)


def student_topk_loss(
    logp_NV: Tensor,
    cand_ids_NK: Tensor,
    old_cand_logp_NK: Tensor,
    teacher_cand_logp_NK: Tensor,
    *,
    variant: Literal["released", "renormalized"] = "released",
    clip_eps: float | None = None,
    cand_valid_NK: Tensor | None = None,
) -> Tensor:
    """Student top-k objective (the paper's default): reverse KL on the student's candidates.

    cand_ids_NK are the student's top-K ids S_t at rollout time, old_cand_logp_NK the rollout
    student's full-vocabulary log-probs there, teacher_cand_logp_NK the teacher's
    full-vocabulary log-probs at exactly those ids (what stock inference servers cannot give).

    "released" (thunlp/OPD code): per-candidate advantages
        A_t(v) = p_bar_old(v) (log q(v) - log p_old(v)),  p_bar_old = p_old renormalised on S_t,
    used as constants in a per-candidate policy gradient, l_t = -sum_v rho(v) A_t(v) with
    rho(v) = exp(log p(v) - log p_old(v)), or PPO's min/clip per candidate with clip_eps.
    The log-ratio is *not* renormalised: the authors note that doing so makes k = 1 vanish.

    "renormalized" (the paper's equation): the exact KL(p_bar || q_bar) on S_t, with p_bar the
    *current* student renormalised on S_t (gradient flows through it) and q_bar the teacher's.
    It is a divergence, not a surrogate, so clip_eps does not apply and is ignored.

    cand_valid_NK (a teacher of another tokenizer): the candidates the teacher has a number
    for (their ids map to its vocabulary); S_t shrinks to them, both renormalisations
    included, and a row with none has loss 0.
    """
    logp_NK = logp_NV.gather(-1, cand_ids_NK)
    teacher_NK = teacher_cand_logp_NK.detach()
    old_NK = old_cand_logp_NK.detach()
    valid_NK, any_N = (None, None) if cand_valid_NK is None else _usable(cand_valid_NK)
    if variant == "renormalized":
        if valid_NK is None:
            return _kl_rows(torch.log_softmax(logp_NK, -1), torch.log_softmax(teacher_NK, -1))
        ninf = torch.full_like(logp_NK, float("-inf"))
        log_pbar_NK = torch.log_softmax(torch.where(valid_NK, logp_NK, ninf), -1)
        log_qbar_NK = torch.log_softmax(torch.where(valid_NK, teacher_NK, ninf), -1)
        return _where_rows(any_N, _kl_rows(*_equalised(log_pbar_NK, log_qbar_NK, valid_NK)))
    if variant != "released":
        raise ValueError(f"variant must be one of {TOPK_VARIANTS}, got {variant!r}")
    if valid_NK is None:
        pbar_old_NK = torch.softmax(old_NK, dim=-1)
    else:
        ninf = torch.full_like(old_NK, float("-inf"))
        pbar_old_NK = torch.softmax(torch.where(valid_NK, old_NK, ninf), -1)
    adv_NK = pbar_old_NK * (teacher_NK - old_NK)
    loss_N = _policy_gradient(logp_NK - old_NK, adv_NK, clip_eps).sum(dim=-1)
    return _where_rows(any_N, loss_N)


def teacher_topk_forward_kl(
    logp_NV: Tensor,
    teacher_ids_Nk: Tensor,
    teacher_logp_Nk: Tensor,
    *,
    tail: bool = True,
    valid_Nk: Tensor | None = None,
) -> Tensor:
    """Forward KL(q || p) on the teacher's top-k ids, made exact in distribution by a tail bucket.

    l_t = sum_{v in T_t} q(v) (log q(v) - log p(v)) [+ q_tail (log q_tail - log p_tail)]

    With tail=True the k ids plus "everything else" are a proper distribution for both q and
    p, so l_t >= 0 and it equals the full-vocabulary KL(q || p) when k = V. The tail logs
    are computed as log(-expm1(logsumexp)), clamped so a top-k holding (numerically) all of the
    mass gives a ~0 tail term instead of log(0).

    With tail=False it is the plain restricted sum, deliberately *not* renormalised: its
    gradient is -sum_T q(v) grad log p(v), the forward-KL gradient on T_t, but its value can be
    negative (p may put more mass on T_t than q does).

    valid_Nk (a teacher of another tokenizer): the teacher ids that map to student ids; the
    others leave the support and their mass joins the tail on both sides (without a tail
    they are dropped); a row with none has loss 0.
    """
    logp_Nk = logp_NV.gather(-1, teacher_ids_Nk)
    logq_Nk = teacher_logp_Nk.detach()
    if valid_Nk is None:
        if tail:
            logp_Nk = _with_tail(logp_Nk)
            logq_Nk = _with_tail(logq_Nk)
        return _kl_rows(logq_Nk, logp_Nk)
    valid, any_N = _usable(valid_Nk)
    logp_NM, logq_NM = logp_Nk, logq_Nk
    if tail:
        ninf = torch.full_like(logp_Nk, float("-inf"))
        logp_NM = torch.cat([logp_Nk, _log_tail(torch.where(valid, logp_Nk, ninf))], -1)
        logq_NM = torch.cat([logq_Nk, _log_tail(torch.where(valid, logq_Nk, ninf))], -1)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], -1)
    logq_NM, logp_NM = _equalised(logq_NM, logp_NM, valid)
    return _where_rows(any_N, _kl_rows(logq_NM, logp_NM))


def teacher_topk_jsd(
    logp_NV: Tensor,
    teacher_ids_Nk: Tensor,
    teacher_logp_Nk: Tensor,
    *,
    beta: float = 0.5,
    tail: bool = True,
    valid_Nk: Tensor | None = None,
) -> Tensor:
    """Generalised JSD(beta) of GKD (Agarwal et al. 2024) on the teacher's top-k ids.

    Convention: TRL's GKDTrainer.generalized_jsd_loss, with q the teacher and p the student:

        m    = beta q + (1 - beta) p
        JSD  = beta KL(q || m) + (1 - beta) KL(p || m)
        beta = 0 -> KL(q || p)  (forward KL, exactly as TRL special-cases it)
        beta = 1 -> KL(p || q)  (reverse KL, likewise)

    (The interior formula tends to 0, not to a KL, as beta -> 0 or 1; the endpoints are
    TRL's definitions, not limits.) The outcomes are the k teacher ids plus, if tail, the tail
    bucket, so both p and q are proper distributions over k + 1 outcomes. Without tail both are
    renormalised over the k ids (softmax), as TRL does for its top-k support: a JSD needs two
    distributions on one support, unlike teacher_topk_forward_kl's plain restricted sum.

    valid_Nk: as teacher_topk_forward_kl's (the unmapped ids' mass joins the tail, or they
    leave the renormalised support); a row with none has loss 0.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    logp_Nk = logp_NV.gather(-1, teacher_ids_Nk)
    logq_Nk = teacher_logp_Nk.detach()
    logp_NM, logq_NM, _, any_N = _support(logp_Nk, logq_Nk, valid_Nk, tail)
    if beta == 0.0:
        return _where_rows(any_N, _kl_rows(logq_NM, logp_NM))
    if beta == 1.0:
        return _where_rows(any_N, _kl_rows(logp_NM, logq_NM))
    # Python-float logs: no host-to-device copy of beta inside the loss path. Entries the
    # support left out hold one shared value on both sides, so m equals it and they add 0.
    logm_NM = torch.logaddexp(logq_NM + math.log(beta), logp_NM + math.log1p(-beta))
    loss_N = beta * _kl_rows(logq_NM, logm_NM) + (1.0 - beta) * _kl_rows(logp_NM, logm_NM)
    return _where_rows(any_N, loss_N)


def overlap_topk_loss(
    logp_NV: Tensor,
    cand_ids_NK: Tensor,
    old_cand_logp_NK: Tensor,
    teacher_cand_logp_NK: Tensor,
    teacher_ids_Nk: Tensor,
    *,
    clip_eps: float | None = None,
    teacher_valid_Nk: Tensor | None = None,
) -> Tensor:
    """The released student top-k loss restricted to I_t = S_t(p) intersect S_t(q).

    The paper finds training on the overlap alone matches student top-k: the candidates both
    models consider plausible carry the signal. A candidate is in I_t when its id appears among
    the teacher's top-k ids of that row; p_bar_old is renormalised over I_t only, so

        A_t(v) = p_old(v) / sum_{u in I_t} p_old(u) * (log q(v) - log p_old(v))   (v in I_t)
        A_t(v) = 0                                                                (v not in I_t)

    and l_t = -sum_v rho(v) A_t(v) (PPO min/clip per candidate with clip_eps). A row with an
    empty overlap has all-zero advantages: loss 0 and no gradient, never NaN.
    teacher_valid_Nk (a teacher of another tokenizer): only teacher ids that map count.
    """
    same_NKk = cand_ids_NK.unsqueeze(-1) == teacher_ids_Nk.unsqueeze(-2)
    if teacher_valid_Nk is not None:
        same_NKk = same_NKk & teacher_valid_Nk.unsqueeze(-2)
    member_NK = same_NKk.any(dim=-1)
    old_NK = old_cand_logp_NK.detach()
    masked_NK = old_NK.masked_fill(~member_NK, float("-inf"))
    log_norm_N1 = torch.logsumexp(masked_NK, dim=-1, keepdim=True)
    # Empty rows have log_norm = -inf; the where keeps their inf/NaN out of the result.
    pbar_old_NK = torch.where(member_NK, torch.exp(old_NK - log_norm_N1), 0.0)
    adv_NK = pbar_old_NK * (teacher_cand_logp_NK.detach() - old_NK)
    logp_NK = logp_NV.gather(-1, cand_ids_NK)
    return _policy_gradient(logp_NK - old_NK, adv_NK, clip_eps).sum(dim=-1)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The registry: one entry per objective
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """One objective: its per-token loss, what it needs from the teacher, the knobs it reads.

    loss(logp_NV, batch, config) -> [N] reads the micro-batch's arrays (opd.client.train
    .positions.TokenBatch) and calls one of the pure functions above. The trainer's score request
    asks the teacher for candidate log-probs only when `needs_candidates`, for its top-k only
    when `needs_teacher_topk` (plus what the diagnostics need, when they are on). `knobs` are the
    ObjectiveConfig fields it reads (declared with the config, OBJECTIVE_KNOBS): setting any
    other knob away from its default is refused when the config is built, since a knob the
    objective ignores is a misconfigured run; ObjectiveConfig.policy_gradient says whether the
    loss is a ratio surrogate, where PPO clipping means something. Adding an objective = its
    name and knobs in opd.client.configs.groups, one entry in REGISTRY, and its test.
    """

    name: str
    loss: Callable[[Tensor, TokenBatch, ObjectiveConfig], Tensor]
    needs_candidates: bool
    needs_teacher_topk: bool
    knobs: frozenset[str]
    summary: str


def _sampled(logp_NV: Tensor, b: TokenBatch, config: ObjectiveConfig) -> Tensor:
    logp_N = logp_NV.gather(1, b.target_N[:, None])[:, 0]
    if config.discount and b.advantages_N is None:
        b = prepare_batch(config, b)
    return sampled_token_loss(
        logp_N,
        b.student_token_logp_N,
        b.teacher_token_logp_N,
        advantages_N=b.advantages_N,
        clip_eps=config.clip_eps,
    )


def _chunk_rows(loss_N: Tensor, logp_NV: Tensor, b: TokenBatch, config: ObjectiveConfig) -> Tensor:
    """A top-k objective's loss on the rows where the teacher's next-token distribution is
    about the student's (a teacher of another tokenizer: chunks of one token on both sides),
    the sampled-token loss on the chunk's reward elsewhere (opd.client.train
    .cross_tokenizer); natively scored batches are returned as they are."""
    if b.one_to_one_N is None:
        return loss_N
    return torch.where(b.one_to_one_N, loss_N, _sampled(logp_NV, b, config))


def _student_topk(logp_NV: Tensor, b: TokenBatch, config: ObjectiveConfig) -> Tensor:
    loss_N = student_topk_loss(
        logp_NV,
        b.student_topk_ids_NK,
        b.student_topk_logp_NK,
        b.teacher_cand_logp_NK,
        variant=config.topk_variant,  # type: ignore[arg-type]
        clip_eps=config.clip_eps,
        cand_valid_NK=b.teacher_cand_valid_NK,
    )
    return _chunk_rows(loss_N, logp_NV, b, config)


def _teacher_topk(logp_NV: Tensor, b: TokenBatch, config: ObjectiveConfig) -> Tensor:
    loss_N = teacher_topk_forward_kl(
        logp_NV,
        b.teacher_topk_ids_Nk,
        b.teacher_topk_logp_Nk,
        tail=config.tail,
        valid_Nk=b.teacher_topk_valid_Nk,
    )
    return _chunk_rows(loss_N, logp_NV, b, config)


def _jsd(logp_NV: Tensor, b: TokenBatch, config: ObjectiveConfig) -> Tensor:
    loss_N = teacher_topk_jsd(
        logp_NV,
        b.teacher_topk_ids_Nk,
        b.teacher_topk_logp_Nk,
        beta=config.jsd_beta,
        tail=config.tail,
        valid_Nk=b.teacher_topk_valid_Nk,
    )
    return _chunk_rows(loss_N, logp_NV, b, config)


def _overlap_topk(logp_NV: Tensor, b: TokenBatch, config: ObjectiveConfig) -> Tensor:
    loss_N = overlap_topk_loss(
        logp_NV,
        b.student_topk_ids_NK,
        b.student_topk_logp_NK,
        b.teacher_cand_logp_NK,
        b.teacher_topk_ids_Nk,
        clip_eps=config.clip_eps,
        teacher_valid_Nk=b.teacher_topk_valid_Nk,
    )
    return _chunk_rows(loss_N, logp_NV, b, config)


REGISTRY: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective(
            "sampled",
            _sampled,
            needs_candidates=False,
            needs_teacher_topk=False,
            knobs=OBJECTIVE_KNOBS["sampled"],
            summary="sampled-token reverse KL (Tinker): one teacher number per token",
        ),
        Objective(
            "student-topk",
            _student_topk,
            needs_candidates=True,
            needs_teacher_topk=False,
            knobs=OBJECTIVE_KNOBS["student-topk"],
            summary="reverse KL on the student's top-K (the paper's default)",
        ),
        Objective(
            "teacher-topk",
            _teacher_topk,
            needs_candidates=False,
            needs_teacher_topk=True,
            knobs=OBJECTIVE_KNOBS["teacher-topk"],
            summary="forward KL on the teacher's top-k, with a tail bucket",
        ),
        Objective(
            "jsd",
            _jsd,
            needs_candidates=False,
            needs_teacher_topk=True,
            knobs=OBJECTIVE_KNOBS["jsd"],
            summary="generalised JSD(beta) of GKD on the teacher's top-k",
        ),
        Objective(
            "overlap-topk",
            _overlap_topk,
            needs_candidates=True,
            needs_teacher_topk=True,
            knobs=OBJECTIVE_KNOBS["overlap-topk"],
            summary="the released student top-k loss on the overlap of both top sets",
        ),
    )
}
OBJECTIVES = tuple(REGISTRY)
# The config's choices are declared without torch (opd.client.configs.groups); they must agree.
assert OBJECTIVES == CONFIG_OBJECTIVES, (OBJECTIVES, CONFIG_OBJECTIVES)


def objective(config: ObjectiveConfig) -> Objective:
    """The registry entry of config.name (ValueError naming the field when unknown)."""
    try:
        return REGISTRY[config.name]
    except KeyError:
        raise ValueError(f"name: must be one of {OBJECTIVES}, got {config.name!r}") from None


def prepare_batch(config: ObjectiveConfig, batch: TokenBatch) -> TokenBatch:
    """The batch with its cross-row quantities filled in, so that any row slice of it
    (TokenBatch.rows, the chunked loss) gives the same per-token loss as the whole batch.

    Only the sampled objective with a discount has one: the return-to-go runs along each
    sequence, so it must see whole sequences (seq_offsets)."""
    if config.name != "sampled" or not config.discount or batch.advantages_N is not None:
        return batch
    if batch.seq_offsets is None:
        raise ValueError("discount: advantages need whole sequences; prepare the whole batch")
    rewards_N = batch.teacher_token_logp_N - batch.student_token_logp_N
    advantages_N = discounted_advantages(rewards_N, batch.seq_offsets, config.discount)
    return replace(batch, advantages_N=advantages_N)


def per_token_loss(config: ObjectiveConfig, logp_NV: Tensor, batch: TokenBatch) -> Tensor:
    """The configured objective's per-token loss [N] on a micro-batch."""
    return objective(config).loss(logp_NV, batch, config)


def needs_teacher_topk(config: ObjectiveConfig) -> bool:
    """Whether the scoring request must ask the teacher for its own top-k ids and log-probs."""
    return objective(config).needs_teacher_topk


def needs_candidates(config: ObjectiveConfig) -> bool:
    """Whether the scoring request must carry the student's top-K candidate ids per position."""
    return objective(config).needs_candidates
