"""opd.client.train.diagnostics on constructed distributions whose answers are known or
written out."""

from __future__ import annotations

import math

import numpy as np
import pytest

from opd.client.train.diagnostics import (
    PositionStats,
    compute_diagnostics,
    overlap_mask,
    sequence_rewards,
)

POSITION_KEYS = {
    "overlap/ratio",
    "overlap/empty_frac",
    "overlap/token_advantage",
    "overlap/mass_student",
    "overlap/mass_teacher",
    "entropy/student",
    "entropy/teacher",
    "entropy/gap",
    "entropy/signed_gap",
    "kl/sampled",
    "kl/student_topk",
    "kl/student_topk_renorm",
    "reward/seq_mean",
    "reward/seq_std",
}


def _stats_from_dists(
    logp_NV: np.ndarray,
    logq_NV: np.ndarray,
    y_N: np.ndarray,
    seq_offsets: list[int],
    K: int,
    k: int | None = None,
) -> PositionStats:
    """What the trainer and the service would report for full distributions p and q."""
    k = K if k is None else k
    rows = np.arange(logp_NV.shape[0])[:, None]
    s_ids_NK = np.argsort(-logp_NV, axis=1, kind="stable")[:, :K]
    t_ids_Nk = np.argsort(-logq_NV, axis=1, kind="stable")[:, :k]
    return PositionStats(
        student_topk_ids_NK=s_ids_NK,
        student_topk_logp_NK=logp_NV[rows, s_ids_NK],
        teacher_topk_ids_Nk=t_ids_Nk,
        teacher_topk_logp_Nk=logq_NV[rows, t_ids_Nk],
        teacher_cand_logp_NK=logq_NV[rows, s_ids_NK],
        student_token_logp_N=logp_NV[np.arange(len(y_N)), y_N],
        teacher_token_logp_N=logq_NV[np.arange(len(y_N)), y_N],
        student_entropy_N=-(np.exp(logp_NV) * logp_NV).sum(axis=1),
        teacher_entropy_N=-(np.exp(logq_NV) * logq_NV).sum(axis=1),
        seq_offsets=np.asarray(seq_offsets, dtype=np.int64),
    )


def _log_softmax(x_NV: np.ndarray) -> np.ndarray:
    x_NV = x_NV - x_NV.max(axis=1, keepdims=True)
    return x_NV - np.log(np.exp(x_NV).sum(axis=1, keepdims=True))


def _brute_force(logp_NV, logq_NV, y_N, seq_offsets, K, k) -> dict[str, float]:
    """The module-docstring formulas, one position at a time with Python sets."""
    kk = min(K, k)
    per: dict[str, list[float]] = {key: [] for key in POSITION_KEYS}
    for t in range(logp_NV.shape[0]):
        p, q = np.exp(logp_NV[t]), np.exp(logq_NV[t])
        s_full = list(np.argsort(-p, kind="stable")[:K])
        inter = set(np.argsort(-p, kind="stable")[:kk]) & set(np.argsort(-q, kind="stable")[:kk])
        per["overlap/ratio"].append(len(inter) / kk)
        per["overlap/empty_frac"].append(float(not inter))
        mp = sum(p[v] for v in inter)
        mq = sum(q[v] for v in inter)
        per["overlap/mass_student"].append(mp)
        per["overlap/mass_teacher"].append(mq)
        if inter:
            a = sum((p[v] / mp) * math.log((q[v] / mq) / (p[v] / mp)) for v in inter)
            per["overlap/token_advantage"].append(a / len(inter))
        hp = -sum(p * np.log(p))
        hq = -sum(q * np.log(q))
        per["entropy/student"].append(hp)
        per["entropy/teacher"].append(hq)
        per["entropy/gap"].append(abs(hq - hp))
        per["entropy/signed_gap"].append(hq - hp)
        per["kl/sampled"].append(math.log(p[y_N[t]]) - math.log(q[y_N[t]]))
        per["kl/student_topk"].append(sum(p[v] * math.log(p[v] / q[v]) for v in s_full))
        zp = sum(p[v] for v in s_full)
        zq = sum(q[v] for v in s_full)
        per["kl/student_topk_renorm"].append(
            sum(p[v] / zp * math.log((p[v] / zp) / (q[v] / zq)) for v in s_full)
        )
    out = {key: float(np.mean(v)) for key, v in per.items() if v}
    rewards = []
    for i in range(len(seq_offsets) - 1):
        ts = range(seq_offsets[i], seq_offsets[i + 1])
        rewards.append(np.mean([-per["kl/sampled"][t] for t in ts]))
    out["reward/seq_mean"] = float(np.mean(rewards))
    out["reward/seq_std"] = float(np.std(rewards))
    return out


def _hand_stats(**over) -> PositionStats:
    """A 1-position, 1-sequence bundle with K = k = 4; fields overridden per test."""
    base = dict(
        student_topk_ids_NK=[[10, 11, 12, 13]],
        student_topk_logp_NK=np.log([[0.4, 0.3, 0.2, 0.05]]),
        teacher_topk_ids_Nk=[[10, 20, 12, 21]],
        teacher_topk_logp_Nk=np.log([[0.5, 0.2, 0.15, 0.1]]),
        teacher_cand_logp_NK=np.log([[0.5, 0.03, 0.15, 0.01]]),
        student_token_logp_N=np.log([0.3]),
        teacher_token_logp_N=np.log([0.03]),
        student_entropy_N=[1.5],
        teacher_entropy_N=[1.8],
        seq_offsets=[0, 1],
    )
    base.update(over)
    return PositionStats(**base)


# ------------------------------------------------------------------ identical / disjoint


def test_student_equals_teacher_gives_zero_kl_and_full_overlap() -> None:
    rng = np.random.default_rng(0)
    logp_NV = _log_softmax(rng.normal(size=(7, 20)) * 2.0)
    y_N = rng.integers(0, 20, size=7)
    stats = _stats_from_dists(logp_NV, logp_NV.copy(), y_N, [0, 3, 7], K=4)
    d = compute_diagnostics(stats)

    assert d["overlap/ratio"] == 1.0
    assert d["overlap/empty_frac"] == 0.0
    assert d["overlap/token_advantage"] == pytest.approx(0.0, abs=1e-12)
    for key in ("kl/sampled", "kl/student_topk", "kl/student_topk_renorm", "reward/seq_mean"):
        assert d[key] == pytest.approx(0.0, abs=1e-12), key
    assert d["entropy/gap"] == 0.0
    assert d["entropy/signed_gap"] == 0.0
    topk_mass = float(np.exp(stats.student_topk_logp_NK).sum(axis=1).mean())
    assert topk_mass < 0.999  # the masses are not renormalised
    assert d["overlap/mass_student"] == pytest.approx(topk_mass, rel=1e-12)
    assert d["overlap/mass_teacher"] == pytest.approx(topk_mass, rel=1e-12)


def test_disjoint_topk_sets() -> None:
    """No shared id anywhere: ratio 0, all positions empty, advantage nan (documented)."""
    stats = _hand_stats(
        student_topk_ids_NK=[[1, 2, 3, 4], [5, 6, 7, 8]],
        student_topk_logp_NK=np.log([[0.4, 0.3, 0.2, 0.1]] * 2),
        teacher_topk_ids_Nk=[[11, 12, 13, 14], [15, 16, 17, 18]],
        teacher_topk_logp_Nk=np.log([[0.4, 0.3, 0.2, 0.1]] * 2),
        teacher_cand_logp_NK=np.full((2, 4), -20.0),
        student_token_logp_N=np.log([0.4, 0.3]),
        teacher_token_logp_N=[-20.0, -20.0],
        student_entropy_N=[1.0, 1.0],
        teacher_entropy_N=[1.0, 1.0],
        seq_offsets=[0, 2],
    )
    d = compute_diagnostics(stats)
    assert d["overlap/ratio"] == 0.0
    assert d["overlap/empty_frac"] == 1.0
    assert math.isnan(d["overlap/token_advantage"])
    assert d["overlap/mass_student"] == 0.0
    assert d["overlap/mass_teacher"] == 0.0
    assert d["kl/sampled"] > 15.0  # the teacher puts ~e^-20 on the student's tokens


def test_advantage_averages_only_nonempty_positions() -> None:
    """One identical position (A = 0) and one disjoint one: advantage 0, empty_frac 0.5."""
    stats = _hand_stats(
        student_topk_ids_NK=[[1, 2], [1, 2]],
        student_topk_logp_NK=np.log([[0.6, 0.3]] * 2),
        teacher_topk_ids_Nk=[[1, 2], [7, 8]],
        teacher_topk_logp_Nk=np.log([[0.6, 0.3], [0.5, 0.4]]),
        teacher_cand_logp_NK=np.log([[0.6, 0.3], [0.01, 0.01]]),
        student_token_logp_N=[-1.0, -1.0],
        teacher_token_logp_N=[-1.0, -1.0],
        student_entropy_N=[1.0, 1.0],
        teacher_entropy_N=[1.0, 1.0],
        seq_offsets=[0, 2],
    )
    d = compute_diagnostics(stats)
    assert d["overlap/empty_frac"] == 0.5
    assert d["overlap/ratio"] == 0.5
    assert d["overlap/token_advantage"] == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------ hand-built K = 4


def test_hand_built_two_shared_ids() -> None:
    """Student top-4 {10, 11, 12, 13}, teacher top-4 {10, 20, 12, 21}: I = {10, 12}."""
    d = compute_diagnostics(_hand_stats())
    p = {10: 0.4, 11: 0.3, 12: 0.2, 13: 0.05}
    q = {10: 0.5, 11: 0.03, 12: 0.15, 13: 0.01}

    assert d["overlap/ratio"] == 0.5
    assert d["overlap/empty_frac"] == 0.0
    assert d["overlap/mass_student"] == pytest.approx(0.4 + 0.2)
    assert d["overlap/mass_teacher"] == pytest.approx(0.5 + 0.15)

    # Renormalised on I: pb = (2/3, 1/3), qb = (10/13, 3/13); A = mean of pb (log qb - log pb).
    pb10, pb12 = 0.4 / 0.6, 0.2 / 0.6
    qb10, qb12 = 0.5 / 0.65, 0.15 / 0.65
    adv = 0.5 * (pb10 * math.log(qb10 / pb10) + pb12 * math.log(qb12 / pb12))
    assert d["overlap/token_advantage"] == pytest.approx(adv, rel=1e-12)
    assert adv < 0

    kl_topk = (
        0.4 * math.log(0.4 / 0.5)
        + 0.3 * math.log(0.3 / 0.03)
        + 0.2 * math.log(0.2 / 0.15)
        + 0.05 * math.log(0.05 / 0.01)
    )
    assert d["kl/student_topk"] == pytest.approx(kl_topk, rel=1e-12)

    zp, zq = sum(p.values()), sum(q.values())
    kl_renorm = sum(p[v] / zp * math.log((p[v] / zp) / (q[v] / zq)) for v in p)
    assert d["kl/student_topk_renorm"] == pytest.approx(kl_renorm, rel=1e-12)

    assert d["kl/sampled"] == pytest.approx(math.log(0.3) - math.log(0.03))
    assert d["reward/seq_mean"] == pytest.approx(math.log(0.03) - math.log(0.3))
    assert d["reward/seq_std"] == 0.0
    assert d["tokens/count"] == 1.0
    assert d["tokens/mean_completion_len"] == 1.0


def test_overlap_mask_is_membership_on_student_columns() -> None:
    in_I = overlap_mask([[10, 11, 12, 13], [1, 2, 3, 4]], [[10, 20, 12, 21], [4, 3, 2, 1]])
    assert in_I.tolist() == [[True, False, True, False], [True, True, True, True]]


def test_different_widths_use_min_k() -> None:
    """K = 4 student, k = 2 teacher: the student's set is cut to its top 2 before intersecting."""
    stats = _hand_stats(
        teacher_topk_ids_Nk=[[10, 20]],
        teacher_topk_logp_Nk=np.log([[0.5, 0.2]]),
    )
    d = compute_diagnostics(stats)
    # student top-2 = {10, 11}, teacher top-2 = {10, 20}: I = {10}
    assert d["overlap/ratio"] == 0.5
    assert d["overlap/mass_student"] == pytest.approx(0.4)
    assert d["overlap/mass_teacher"] == pytest.approx(0.5)
    # A single shared id renormalises to 1 on both sides.
    assert d["overlap/token_advantage"] == pytest.approx(0.0, abs=1e-12)
    # The student-top-K KL still uses all 4 candidates.
    assert d["kl/student_topk"] == pytest.approx(
        compute_diagnostics(_hand_stats())["kl/student_topk"]
    )


@pytest.mark.parametrize(("K", "k"), [(4, 4), (3, 5), (5, 3)])
def test_matches_brute_force_on_random_distributions(K: int, k: int) -> None:
    rng = np.random.default_rng(K * 10 + k)
    n_pos, vocab = 11, 9
    logp_NV = _log_softmax(rng.normal(size=(n_pos, vocab)) * 1.5)
    logq_NV = _log_softmax(rng.normal(size=(n_pos, vocab)) * 1.5)
    y_N = rng.integers(0, vocab, size=n_pos)
    offsets = [0, 4, 5, 11]
    stats = _stats_from_dists(logp_NV, logq_NV, y_N, offsets, K=K, k=k)
    got = compute_diagnostics(stats, depth_bucket=None)
    want = _brute_force(logp_NV, logq_NV, y_N, offsets, K, k)
    assert 0.0 < got["overlap/ratio"] < 1.0  # a case with partial overlaps
    for key in POSITION_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


def test_zero_probabilities_stay_finite() -> None:
    """-inf log-probs (masked vocab) are floored: no nan, large but finite KL."""
    stats = _hand_stats(
        teacher_cand_logp_NK=[[np.log(0.5), -np.inf, np.log(0.15), -np.inf]],
        student_topk_logp_NK=[[np.log(0.4), np.log(0.3), np.log(0.2), -np.inf]],
        teacher_token_logp_N=[-np.inf],
    )
    with np.errstate(divide="raise", invalid="raise", over="raise"):
        d = compute_diagnostics(stats)
    assert all(math.isfinite(v) for v in d.values())
    assert d["kl/student_topk"] > 100.0
    assert d["kl/sampled"] > 100.0


# ------------------------------------------------------------------ entropy, rewards


def test_entropy_gap_sign_and_absolute_value() -> None:
    stats = _hand_stats(
        student_topk_ids_NK=[[1, 2]] * 3,
        student_topk_logp_NK=np.log([[0.5, 0.25]] * 3),
        teacher_topk_ids_Nk=[[1, 2]] * 3,
        teacher_topk_logp_Nk=np.log([[0.5, 0.25]] * 3),
        teacher_cand_logp_NK=np.log([[0.5, 0.25]] * 3),
        student_token_logp_N=[-1.0] * 3,
        teacher_token_logp_N=[-1.0] * 3,
        student_entropy_N=[1.0, 2.0, 3.0],
        teacher_entropy_N=[2.0, 1.0, 3.5],
        seq_offsets=[0, 3],
    )
    d = compute_diagnostics(stats)
    assert d["entropy/student"] == pytest.approx(2.0)
    assert d["entropy/teacher"] == pytest.approx(6.5 / 3)
    assert d["entropy/gap"] == pytest.approx((1.0 + 1.0 + 0.5) / 3)
    assert d["entropy/signed_gap"] == pytest.approx((1.0 - 1.0 + 0.5) / 3)


def _rewards_stats(tok_reward_N: list[float], seq_offsets: list[int]) -> PositionStats:
    """Identical top-k at every position; the sampled-token log-probs carry the reward."""
    n_pos = len(tok_reward_N)
    lp_N = np.full(n_pos, -1.0)
    return _hand_stats(
        student_topk_ids_NK=[[1, 2]] * n_pos,
        student_topk_logp_NK=np.log([[0.5, 0.25]] * n_pos),
        teacher_topk_ids_Nk=[[1, 2]] * n_pos,
        teacher_topk_logp_Nk=np.log([[0.5, 0.25]] * n_pos),
        teacher_cand_logp_NK=np.log([[0.5, 0.25]] * n_pos),
        student_token_logp_N=lp_N,
        teacher_token_logp_N=lp_N + np.asarray(tok_reward_N),
        student_entropy_N=np.zeros(n_pos),
        teacher_entropy_N=np.zeros(n_pos),
        seq_offsets=seq_offsets,
    )


def test_sequence_rewards_two_lengths() -> None:
    # sequence 0: log q - log p = (-0.1, -0.3) -> -0.2; sequence 1: (0.0, -0.6, 0.3) -> -0.1
    stats = _rewards_stats([-0.1, -0.3, 0.0, -0.6, 0.3], [0, 2, 5])
    np.testing.assert_allclose(sequence_rewards(stats), [-0.2, -0.1], rtol=1e-12)
    d = compute_diagnostics(stats)
    assert d["reward/seq_mean"] == pytest.approx(-0.15)  # per sequence, not per token (-0.14)
    assert d["reward/seq_std"] == pytest.approx(0.05)
    assert d["kl/sampled"] == pytest.approx(0.14)  # per token
    assert d["tokens/count"] == 5.0
    assert d["tokens/mean_completion_len"] == 2.5


def test_empty_sequence_has_nan_reward_and_is_skipped() -> None:
    stats = _rewards_stats([-0.1, -0.3], [0, 2, 2])
    r = sequence_rewards(stats)
    assert r[0] == pytest.approx(-0.2)
    assert math.isnan(r[1])
    d = compute_diagnostics(stats)
    assert d["reward/seq_mean"] == pytest.approx(-0.2)
    assert d["tokens/mean_completion_len"] == 1.0


# ------------------------------------------------------------------ depth buckets


def test_depth_buckets() -> None:
    """Lengths 3 and 5, bucket 2: depths (0,1,2) and (0,1,2,3,4) -> buckets 0-1, 2-3, 4-5."""
    depth_N = np.array([0, 1, 2, 0, 1, 2, 3, 4])
    shallow_N = depth_N < 2
    n_pos = depth_N.size
    # Full overlap at depth < 2, disjoint beyond; student entropy = depth; reward = -depth - seq.
    seq_N = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    tok_reward_N = -depth_N - seq_N.astype(float)
    stats = PositionStats(
        student_topk_ids_NK=np.tile([1, 2], (n_pos, 1)),
        student_topk_logp_NK=np.log([[0.5, 0.25]] * n_pos),
        teacher_topk_ids_Nk=np.where(shallow_N[:, None], [1, 2], [7, 8]),
        teacher_topk_logp_Nk=np.log([[0.5, 0.25]] * n_pos),
        teacher_cand_logp_NK=np.where(shallow_N[:, None], np.log([0.5, 0.25]), np.log(0.01)),
        student_token_logp_N=np.full(n_pos, -1.0),
        teacher_token_logp_N=-1.0 + tok_reward_N,
        student_entropy_N=depth_N.astype(float),
        teacher_entropy_N=np.zeros(n_pos),
        seq_offsets=[0, 3, 8],
    )
    d = compute_diagnostics(stats, depth_bucket=2)

    labels = ("depth0-1", "depth2-3", "depth4-5")
    for label in labels:
        assert {f"{key}@{label}" for key in POSITION_KEYS} <= d.keys()
    assert not any(key.startswith("tokens/") and "@" in key for key in d)
    assert sorted({key.split("@")[1] for key in d if "@" in key}) == sorted(labels)

    assert d["overlap/ratio@depth0-1"] == 1.0
    assert d["overlap/ratio@depth2-3"] == 0.0
    assert d["overlap/ratio@depth4-5"] == 0.0
    assert d["overlap/ratio"] == pytest.approx(4 / 8)
    assert d["overlap/empty_frac@depth2-3"] == 1.0
    assert math.isnan(d["overlap/token_advantage@depth4-5"])
    assert d["entropy/student@depth0-1"] == pytest.approx((0 + 1 + 0 + 1) / 4)
    assert d["entropy/student@depth2-3"] == pytest.approx((2 + 2 + 3) / 3)
    assert d["entropy/student@depth4-5"] == pytest.approx(4.0)
    # Bucket rewards: per sequence, the mean over its positions in the bucket, then over sequences.
    # depth 0-1: seq0 (0, -1) -> -0.5, seq1 (-1, -2) -> -1.5
    assert d["reward/seq_mean@depth0-1"] == pytest.approx(-1.0)
    assert d["reward/seq_std@depth0-1"] == pytest.approx(0.5)
    # depth 2-3: seq0 (-2) -> -2, seq1 (-3, -4) -> -3.5
    assert d["reward/seq_mean@depth2-3"] == pytest.approx(-2.75)
    # depth 4-5: only seq1 (-5)
    assert d["reward/seq_mean@depth4-5"] == pytest.approx(-5.0)
    assert d["reward/seq_std@depth4-5"] == 0.0

    assert not any("@" in key for key in compute_diagnostics(stats, depth_bucket=None))
    default = compute_diagnostics(stats)
    assert {key.split("@")[1] for key in default if "@" in key} == {"depth0-1023"}
    with pytest.raises(ValueError, match="depth_bucket"):
        compute_diagnostics(stats, depth_bucket=0)


# ------------------------------------------------------------------ PositionStats


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("teacher_entropy_N", [1.8, 1.0]),
        ("teacher_cand_logp_NK", np.log([[0.5, 0.03, 0.15]])),
        ("teacher_topk_logp_Nk", np.log([[0.5, 0.2, 0.15]])),
        ("student_topk_ids_NK", [[10.0, 11.0, 12.0, 13.0]]),
        ("seq_offsets", [0, 2]),
    ],
)
def test_validate_names_the_bad_field(field: str, value: object) -> None:
    stats = _hand_stats(**{field: value})
    with pytest.raises(ValueError, match=field):
        stats.validate()
    with pytest.raises(ValueError, match=field):
        compute_diagnostics(stats)


def test_validate_accepts_lists_and_float32() -> None:
    stats = _hand_stats(
        student_topk_logp_NK=np.log([[0.4, 0.3, 0.2, 0.05]]).astype(np.float32).tolist(),
        teacher_cand_logp_NK=np.log([[0.5, 0.03, 0.15, 0.01]]).astype(np.float32),
    )
    assert stats.validate() is stats
    assert isinstance(stats.student_topk_logp_NK, np.ndarray)
    d = compute_diagnostics(stats)
    assert d["overlap/mass_student"] == pytest.approx(0.6, rel=1e-6)


def test_concat_shifts_offsets() -> None:
    a = _rewards_stats([-0.1, -0.3, 0.0], [0, 1, 3])
    b = _rewards_stats([-0.6, 0.3], [0, 2])
    c = PositionStats.concat([a, b])
    assert c.validate() is c
    assert c.seq_offsets.tolist() == [0, 1, 3, 5]
    assert c.n_positions == 5
    assert c.n_sequences == 3
    np.testing.assert_allclose(
        sequence_rewards(c), np.r_[sequence_rewards(a), sequence_rewards(b)], rtol=1e-12
    )
    with pytest.raises(ValueError, match="at least one"):
        PositionStats.concat([])
