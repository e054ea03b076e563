"""OPD diagnostics: the paper's "phenomenology", computed every step from the numbers the student
already has and the teacher service returns, so a failing student/teacher pair shows up early
(flat overlap, overlap-token advantage stuck negative, entropy gap not closing).

Notation: the arrays and shape suffixes (N, K, k, seq_offsets) of opd.client.train.positions,
whose PositionStats is the bundle read here, and:
    p_t, q_t        student and teacher next-token distributions at position t (full vocabulary).
    S_t(p), S_t(q)  their top-k id sets; I_t = S_t(p) intersect S_t(q).
    y_t             the sampled (student's own) token at t.
    depth(t)        t - seq_offsets[seq(t)]: 0 for the first completion token of each sequence;
                    in episodes (stats.depth_N set) the absolute token depth: tokens since the
                    episode's first assistant token, tool results and user turns included.
    turn(t)         episodes only (stats.turn_N): the assistant turn t belongs to, 0 first.

Metrics, keys as returned by `compute_diagnostics` (means over positions t unless said):
    overlap/ratio             mean_t |I_t| / min(K, k)
    overlap/empty_frac        mean_t [I_t is empty]
    overlap/token_advantage   mean over the t with non-empty I_t of
                                A_t = (1/|I_t|) sum_{v in I_t} pb_t(v) (log qb_t(v) - log pb_t(v)),
                                pb_t = p_t / sum_{I_t} p_t,  qb_t = q_t / sum_{I_t} q_t;
                              nan when every I_t is empty (0 would falsely read as "aligned")
    overlap/mass_student      mean_t sum_{v in I_t} p_t(v)   (NOT renormalised)
    overlap/mass_teacher      mean_t sum_{v in I_t} q_t(v)   (NOT renormalised)
    entropy/student           mean_t H(p_t)
    entropy/teacher           mean_t H(q_t)
    entropy/gap               mean_t |H(q_t) - H(p_t)|
    entropy/signed_gap        mean_t (H(q_t) - H(p_t))   (> 0: the student is sharper)
    kl/sampled                mean_t (log p_t(y_t) - log q_t(y_t)); unbiased for KL(p_t || q_t)
    kl/student_topk           mean_t sum_{v in S_t(p)} p_t(v) (log p_t(v) - log q_t(v))
    kl/student_topk_renorm    mean_t KL(pb_t || qb_t), both renormalised on S_t(p)
    reward/seq_mean           mean over sequences of
                                r(y) = (1/T) sum_t (log q_t(y_t) - log p_t(y_t))
    reward/seq_std            their standard deviation (ddof 0)
    tokens/count              N
    tokens/mean_completion_len  N / n
    Across tokenizers (stats.one_to_one_N set; opd.client.train.cross_tokenizer):
    kl/sampled                per student token: the aligned chunks' log-ratios, split evenly
                              over their tokens, so the mean is sum over chunks / N
    kl/sampled_per_chunk      mean over chunks of log p(c) - log q(c)
    overlap/*, entropy/*, kl/student_topk*  on positions whose chunk is one token on both
                              sides only (elsewhere neither model's next-token distribution is
                              about the other's token), over teacher ids that map
    xtok/chunks, xtok/student_tokens_per_chunk, xtok/one_to_one_frac (student tokens in
                              one-to-one chunks), xtok/candidates_mapped_frac
    <key>@depth{a}-{b}        every key but tokens/* on the positions with a <= depth <= b; the
                              reward uses, per sequence, the mean over its positions in the bucket
    <key>@turn{j}             episodes: every key but tokens/* on the positions of assistant turn
                              j (reward/*: per episode, the mean over its turn-j positions), plus
                              tokens/count@turn{j}

Choices where the definition leaves room:
    * K != k: both top sets are cut to k' = min(K, k) (highest log-probs first) before
      intersecting, so the overlap compares equal-size sets as the paper's single-k definition
      does, and the ratio divides by k'. kl/student_topk* always use all K student candidates.
    * q_t(v) on I_t is read from teacher_cand_logp_NK (the teacher's log-probs at the student's
      ids), which equals teacher_topk_logp_Nk there and is already aligned with the student's
      columns.
    * Log-probs are floored at log(float64 tiny) ~ -708 so a zero probability (-inf) gives large
      but finite KL / reward terms and 0 * log 0 terms vanish instead of turning into nan.
    * Sequences with no completion positions get a nan reward and are left out of reward/*.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from opd.client.train.positions import PositionStats

__all__ = [
    "PositionStats",
    "compute_diagnostics",
    "overlap_by_depth",
    "overlap_mask",
    "overlap_ratio",
    "overlap_token_advantage",
    "position_depths",
    "per_position_metrics",
    "sampled_kl",
    "sequence_rewards",
    "student_topk_kl",
]

# log of the smallest normal float64: -inf log-probs are raised to it (see module docstring).
_LOG_FLOOR = float(np.log(np.finfo(np.float64).tiny))
# Rows per block in the [rows, K, k] membership broadcast: caps its memory at ~16 MiB for k = 16.
_CHUNK_ROWS = 1 << 16


# --------------------------------------------------------------------------------------------
# Math on arrays (pure; every formula is in the module docstring too)
# --------------------------------------------------------------------------------------------


def _floor_log(logp: Any) -> np.ndarray:
    """float64 copy of log-probs with -inf raised to _LOG_FLOOR (nan stays nan, on purpose)."""
    return np.maximum(np.asarray(logp, dtype=np.float64), _LOG_FLOOR)


def _mean(x: np.ndarray) -> float:
    """Mean that is nan (not a RuntimeWarning) on an empty array: an empty bucket is 'unknown'."""
    return float(np.mean(x)) if x.size else float("nan")


def _masked_logsumexp(logp_NK: np.ndarray, mask_NK: np.ndarray) -> np.ndarray:
    """log sum_{j: mask[t, j]} exp(logp[t, j]) per row, stably; -inf for rows with an empty mask.

    This is log of the mass a set holds, i.e. the normaliser of a renormalised distribution.
    """
    # m_t = max_{j in mask} logp[t, j]; lse_t = m_t + log sum_{j in mask} exp(logp[t, j] - m_t)
    m_N = np.max(np.where(mask_NK, logp_NK, -np.inf), axis=1, initial=-np.inf)
    m_safe_N = np.where(np.isfinite(m_N), m_N, 0.0)
    shifted_NK = np.where(mask_NK, logp_NK - m_safe_N[:, None], -np.inf)
    s_N = np.exp(shifted_NK).sum(axis=1)
    with np.errstate(divide="ignore"):
        return m_safe_N + np.log(s_N)


def overlap_mask(student_ids_NK: Any, teacher_ids_Nk: Any) -> np.ndarray:
    """in_I_NK[t, j] = student_ids_NK[t, j] in S_t(q): which student candidates lie in I_t.

    Kept on the student's columns so that p and q (via the teacher's log-probs at the student's
    ids) at I_t are plain masked reads. Broadcast in row blocks to bound memory at N * K * k.
    """
    ids_NK = np.asarray(student_ids_NK)
    ids_Nk = np.asarray(teacher_ids_Nk)
    out_NK = np.empty(ids_NK.shape, dtype=bool)
    for a in range(0, ids_NK.shape[0], _CHUNK_ROWS):
        b = a + _CHUNK_ROWS
        # member[t, j, i] = (student id j == teacher id i) at row t; any over i
        out_NK[a:b] = (ids_NK[a:b, :, None] == ids_Nk[a:b, None, :]).any(axis=2)
    return out_NK


def overlap_token_advantage(
    student_logp_NK: Any, teacher_logp_NK: Any, in_I_NK: np.ndarray
) -> np.ndarray:
    """A_t per position: how much the teacher disagrees with the student *inside* the shared set.

    A_t = (1/|I_t|) sum_{v in I_t} pb(v) (log qb(v) - log pb(v)), with p and q renormalised on
    I_t (log pb = log p - log sum_{I_t} p). It is -KL(pb || qb) / |I_t| <= 0: near 0 means
    aligned, strongly negative means the student is over-confident on tokens the teacher also
    ranks highly. nan at positions with an empty I_t (no shared set to compare on).
    Inputs are full-vocab log-probs on the same columns (the student's), masked by in_I_NK.
    """
    lp_NK = _floor_log(student_logp_NK)
    lq_NK = _floor_log(teacher_logp_NK)
    mask_NK = np.asarray(in_I_NK, dtype=bool)
    count_N = mask_NK.sum(axis=1)
    nonempty_N = count_N > 0
    lse_p_N = np.where(nonempty_N, _masked_logsumexp(lp_NK, mask_NK), 0.0)
    lse_q_N = np.where(nonempty_N, _masked_logsumexp(lq_NK, mask_NK), 0.0)
    log_pb_NK = np.where(mask_NK, lp_NK - lse_p_N[:, None], 0.0)
    log_qb_NK = np.where(mask_NK, lq_NK - lse_q_N[:, None], 0.0)
    # term[t, j] = pb(v_j) (log qb(v_j) - log pb(v_j)) for v_j in I_t, else 0
    term_NK = np.where(mask_NK, np.exp(log_pb_NK) * (log_qb_NK - log_pb_NK), 0.0)
    return np.where(nonempty_N, term_NK.sum(axis=1) / np.maximum(count_N, 1), np.nan)


def student_topk_kl(student_logp_NK: Any, teacher_cand_logp_NK: Any, renorm: bool) -> np.ndarray:
    """Per-position reverse KL restricted to the student's top-K, the paper's default objective.

    renorm=False: sum_{v in S(p)} p(v) (log p(v) - log q(v)) with full-vocab p, q (the top-K
    share of KL(p || q), what the released code's per-candidate reward sums to, up to p vs pb).
    renorm=True:  KL(pb || qb), p and q renormalised on S(p) (the paper's equation).
    A candidate the teacher has no number for (NaN: across tokenizers, an id that does not
    map) leaves S(p); a row with none left is nan.
    """
    lp_NK = _floor_log(student_logp_NK)
    lq_NK = _floor_log(teacher_cand_logp_NK)
    have_NK = ~np.isnan(lq_NK)
    if renorm:
        # log pb = log p - log sum_{S(p)} p, same for q
        lp_NK = lp_NK - _masked_logsumexp(lp_NK, have_NK)[:, None]
        lq_NK = lq_NK - _masked_logsumexp(lq_NK, have_NK)[:, None]
    with np.errstate(invalid="ignore"):
        terms_NK = np.where(have_NK, np.exp(lp_NK) * (lp_NK - lq_NK), 0.0)
    return np.where(have_NK.any(axis=1), terms_NK.sum(axis=1), np.nan)


def _topk_by_logp(k: int, logp_NK: np.ndarray, *cols_NK: np.ndarray) -> tuple[np.ndarray, ...]:
    """The k columns with the highest logp per row (and the same columns of cols_NK).

    Only used when the student's and teacher's widths differ, to intersect equal-size sets.
    """
    if logp_NK.shape[1] <= k:
        return (logp_NK, *cols_NK)
    idx_Nk = np.argsort(-logp_NK, axis=1, kind="stable")[:, :k]
    return tuple(np.take_along_axis(a, idx_Nk, axis=1) for a in (logp_NK, *cols_NK))


def _seq_ids(seq_offsets: np.ndarray) -> np.ndarray:
    """seq_N[t] = i for the rows of sequence i."""
    lens_n = np.diff(seq_offsets)
    return np.repeat(np.arange(lens_n.size), lens_n)


def _depths(seq_offsets: np.ndarray) -> np.ndarray:
    """depth_N[t] = t - seq_offsets[seq(t)] (0 at each sequence's first completion token)."""
    lens_n = np.diff(seq_offsets)
    return np.arange(int(seq_offsets[-1]) - int(seq_offsets[0])) - np.repeat(
        seq_offsets[:-1] - seq_offsets[0], lens_n
    )


def _token_rewards(stats: PositionStats) -> np.ndarray:
    """Dense OPD reward per position: log q_t(y_t) - log p_t(y_t) (= -per-token reverse KL)."""
    return _floor_log(stats.teacher_token_logp_N) - _floor_log(stats.student_token_logp_N)


def _mean_per_sequence(x_N: np.ndarray, seq_N: np.ndarray, n: int) -> np.ndarray:
    """Mean of x over each sequence's rows; nan for sequences without rows."""
    sums_n = np.bincount(seq_N, weights=x_N, minlength=n)
    counts_n = np.bincount(seq_N, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts_n > 0, sums_n / np.maximum(counts_n, 1), np.nan)


def sampled_kl(stats: PositionStats) -> float:
    """kl/sampled alone: mean_t (log p_t(y_t) - log q_t(y_t)), from the token log-probs only.

    What a run with the diagnostics off still logs: every score response carries the teacher's
    log-prob of the sampled token, so this costs the teacher nothing extra."""
    if stats.teacher_token_logp_N is None:
        raise ValueError("teacher_token_logp_N is missing: the rollouts were not scored")
    return _mean(-_token_rewards(stats))


def sequence_rewards(stats: PositionStats) -> np.ndarray:
    """r(y) = (1/T) sum_t [log q_t(y_t) - log p_t(y_t)] per sequence ([n]; nan if T = 0).

    A length-normalised teacher-vs-student log-likelihood ratio of the whole completion; the
    paper finds it predicts correctness (opd.client.evaluation.rewards: its AUROC in the probe).
    """
    stats.validate()
    offs = stats.seq_offsets
    return _mean_per_sequence(_token_rewards(stats), _seq_ids(offs), stats.n_sequences)


def position_depths(stats: PositionStats) -> np.ndarray:
    """depth_N: each position's depth (episodes: absolute, context included; else its index
    in its completion)."""
    if stats.depth_N is not None:
        return stats.depth_N.astype(np.int64)
    return _depths(stats.seq_offsets.astype(np.int64))


def overlap_ratio(stats: PositionStats) -> np.ndarray:
    """overlap/ratio per position, |I_t| / min(K, k), from the two top sets alone (what
    the adaptive horizon reads: it needs no candidate log-probs or entropies)."""
    ids_NK, ids_Nk = stats.student_topk_ids_NK, stats.teacher_topk_ids_Nk
    if ids_Nk is None or stats.teacher_topk_logp_Nk is None:
        raise ValueError("teacher_topk_ids_Nk is missing: the overlap needs the teacher's top-k")
    k_eff = min(ids_NK.shape[1], ids_Nk.shape[1])
    _, o_ids_NK = _topk_by_logp(k_eff, _floor_log(stats.student_topk_logp_NK), ids_NK)
    _, o_ids_Nk = _topk_by_logp(k_eff, _floor_log(stats.teacher_topk_logp_Nk), ids_Nk)
    return overlap_mask(o_ids_NK, o_ids_Nk).sum(axis=1) / k_eff


def overlap_by_depth(stats: PositionStats) -> tuple[np.ndarray, np.ndarray]:
    """(depth, overlap/ratio) of the positions where the overlap is defined: all of them, or
    across tokenizers those whose chunk is one token on both sides (what the adaptive
    horizon and the probe's recommendation read)."""
    depth_N, overlap_N = position_depths(stats), overlap_ratio(stats)
    if stats.one_to_one_N is None:
        return depth_N, overlap_N
    return depth_N[stats.one_to_one_N], overlap_N[stats.one_to_one_N]


def per_position_metrics(stats: PositionStats) -> dict[str, np.ndarray]:
    """Each position-mean metric as its [N] per-position value, keyed like compute_diagnostics.

    Public so a caller can plot a metric against depth; overlap/token_advantage is nan where
    I_t is empty. Assumes stats.validate() passed.
    """
    lp_NK = _floor_log(stats.student_topk_logp_NK)
    lq_cand_NK = _floor_log(stats.teacher_cand_logp_NK)
    ids_NK = stats.student_topk_ids_NK
    ids_Nk = stats.teacher_topk_ids_Nk
    k_eff = min(ids_NK.shape[1], ids_Nk.shape[1])
    # Equal-size top sets before intersecting (no-op when K == k).
    o_lp_NK, o_ids_NK, o_lq_NK = _topk_by_logp(k_eff, lp_NK, ids_NK, lq_cand_NK)
    _, o_ids_Nk = _topk_by_logp(k_eff, _floor_log(stats.teacher_topk_logp_Nk), ids_Nk)
    in_I_NK = overlap_mask(o_ids_NK, o_ids_Nk)
    count_N = in_I_NK.sum(axis=1)
    h_p_N = np.asarray(stats.student_entropy_N, dtype=np.float64)
    h_q_N = np.asarray(stats.teacher_entropy_N, dtype=np.float64)
    return {
        # |I_t| / min(K, k)
        "overlap/ratio": count_N / k_eff,
        "overlap/empty_frac": (count_N == 0).astype(np.float64),
        "overlap/token_advantage": overlap_token_advantage(o_lp_NK, o_lq_NK, in_I_NK),
        # sum_{v in I_t} p_t(v), sum_{v in I_t} q_t(v), not renormalised
        "overlap/mass_student": np.where(in_I_NK, np.exp(o_lp_NK), 0.0).sum(axis=1),
        "overlap/mass_teacher": np.where(in_I_NK, np.exp(o_lq_NK), 0.0).sum(axis=1),
        "entropy/student": h_p_N,
        "entropy/teacher": h_q_N,
        "entropy/gap": np.abs(h_q_N - h_p_N),
        "entropy/signed_gap": h_q_N - h_p_N,
        # log p(y_t) - log q(y_t)
        "kl/sampled": -_token_rewards(stats),
        "kl/student_topk": student_topk_kl(lp_NK, lq_cand_NK, renorm=False),
        "kl/student_topk_renorm": student_topk_kl(lp_NK, lq_cand_NK, renorm=True),
    }


# Metrics averaged only over positions where they are defined (nan = undefined, not an error).
_MEAN_OVER_DEFINED = frozenset({"overlap/token_advantage"})
# Metrics of the two next-token distributions: across tokenizers defined only on positions
# whose chunk is one token on both sides (PositionStats.one_to_one_N), nan elsewhere.
_DISTRIBUTION_KEYS = ("overlap/", "entropy/", "kl/student_topk")


def _aggregate(
    per_pos: dict[str, np.ndarray],
    tok_reward_N: np.ndarray,
    seq_N: np.ndarray,
    n: int,
    rows: np.ndarray | slice,
    cross: bool = False,
) -> dict[str, float]:
    """Position means over `rows`, plus reward/* over the sequences that have rows there."""
    out: dict[str, float] = {}
    for key, x_N in per_pos.items():
        x = x_N[rows]
        defined_only = key in _MEAN_OVER_DEFINED or (cross and key.startswith(_DISTRIBUTION_KEYS))
        out[key] = _mean(x[~np.isnan(x)]) if defined_only else _mean(x)
    r_n = _mean_per_sequence(tok_reward_N[rows], seq_N[rows], n)
    r_n = r_n[~np.isnan(r_n)]
    out["reward/seq_mean"] = _mean(r_n)
    out["reward/seq_std"] = float(np.std(r_n)) if r_n.size else float("nan")
    return out


def compute_diagnostics(stats: PositionStats, depth_bucket: int | None = 1024) -> dict[str, float]:
    """All diagnostics of one batch as a flat {namespaced key: float} dict, ready to log.

    Keys and formulas are listed in the module docstring. With depth_bucket = B, every key but
    tokens/* is repeated as `<key>@depth{a}-{a+B-1}` for each bucket holding any position
    (the paper sees instability start at the end of long responses); None turns that off.
    """
    stats.validate()
    if depth_bucket is not None and depth_bucket < 1:
        raise ValueError(f"depth_bucket must be a positive int or None, got {depth_bucket}")
    n = stats.n_sequences
    offs = stats.seq_offsets.astype(np.int64)
    seq_N = _seq_ids(offs)
    per_pos = per_position_metrics(stats)
    tok_reward_N = _token_rewards(stats)
    cross = stats.one_to_one_N is not None
    if cross:
        for key in per_pos:
            if key.startswith(_DISTRIBUTION_KEYS):
                per_pos[key] = np.where(stats.one_to_one_N, per_pos[key], np.nan)

    out = _aggregate(per_pos, tok_reward_N, seq_N, n, slice(None), cross)
    out["tokens/count"] = float(stats.n_positions)
    out["tokens/mean_completion_len"] = stats.n_positions / n if n else float("nan")
    if cross:
        out.update(chunk_metrics(stats, seq_N))

    if depth_bucket is not None and stats.n_positions:
        depth_N = position_depths(stats)
        for b, rows in _groups(depth_N // depth_bucket):
            start = b * depth_bucket
            label = f"depth{start}-{start + depth_bucket - 1}"
            sub = _aggregate(per_pos, tok_reward_N, seq_N, n, rows, cross)
            out.update({f"{key}@{label}": v for key, v in sub.items()})
    if stats.turn_N is not None and stats.n_positions:
        for j, rows in _groups(stats.turn_N.astype(np.int64)):
            sub = _aggregate(per_pos, tok_reward_N, seq_N, n, rows, cross)
            out.update({f"{key}@turn{j}": v for key, v in sub.items()})
            out[f"tokens/count@turn{j}"] = float(rows.size)
    return out


def chunk_metrics(stats: PositionStats, seq_N: np.ndarray) -> dict[str, float]:
    """Across tokenizers: the sampled KL per aligned chunk (kl/sampled is per student token),
    and how the two tokenizations met (xtok/*)."""
    assert stats.chunk_N is not None and stats.one_to_one_N is not None
    if not stats.n_positions:
        return {}
    key_N = seq_N.astype(np.int64) * (int(stats.chunk_N.max()) + 1) + stats.chunk_N
    _, chunk_of_N = np.unique(key_N, return_inverse=True)
    kl_C = np.bincount(chunk_of_N, weights=-_token_rewards(stats))
    out = {
        "kl/sampled_per_chunk": _mean(kl_C),
        "xtok/chunks": float(kl_C.size),
        "xtok/student_tokens_per_chunk": stats.n_positions / kl_C.size,
        "xtok/one_to_one_frac": _mean(stats.one_to_one_N.astype(np.float64)),
    }
    if stats.teacher_cand_logp_NK is not None and stats.one_to_one_N.any():
        have = ~np.isnan(stats.teacher_cand_logp_NK[stats.one_to_one_N])
        out["xtok/candidates_mapped_frac"] = _mean(have.astype(np.float64))
    return out


def _groups(label_N: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(label, its row indices) per distinct label, ascending; rows grouped once by a stable
    sort, so each group costs its own size (not N)."""
    order_N = np.argsort(label_N, kind="stable")
    labels, starts = np.unique(label_N[order_N], return_index=True)
    ends = np.r_[starts[1:], order_N.size]
    return [(int(b), order_N[lo:hi]) for b, lo, hi in zip(labels, starts, ends, strict=True)]
