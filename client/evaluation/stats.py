"""The statistics of an evaluation: pass@k, confidence intervals, AUROC and gap recovery.

numpy only (no scipy): the normal quantile comes from the standard library's NormalDist. Every
function states its formula, so a number in a report can be checked by hand.

Intervals: `wilson_interval` treats its trials as independent coin flips; `bootstrap_interval`
resamples *prompts*, the unit that is actually independent. n samples of one prompt are
correlated (an easy prompt is answered right every time), so pooling them as independent
trials understates the uncertainty; the bootstrap of per-prompt scores does not, which is why
`summarize` defaults to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

Z_95 = 1.959963984540054
"""The two-sided 95% normal quantile, Phi^-1(0.975)."""

_BOOTSTRAP_CELLS = 1 << 22  # resampled indices held at once (32 MiB of int64)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator of Chen et al. (2021), from n samples of which c are
    correct: the chance that k samples drawn without replacement include a correct one,

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i),

    computed in the product form, which stays accurate where the binomials overflow a float.
    pass@1 = c / n; pass@k = 1 when n - c < k (every draw of k contains a correct one).
    """
    if n < 1:
        raise ValueError(f"pass_at_k: n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion p = s / n:

        (p + z^2 / 2n  -/+  z * sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n).

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not degenerate at 0/n or
    n/n, which small evaluation sets hit often. trials == 0 gives (nan, nan): no data, no
    interval. The trials are assumed independent (see the module docstring).
    """
    if not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval: need 0 <= successes <= trials: {successes}/{trials}")
    if trials == 0:
        return (math.nan, math.nan)
    p = successes / trials
    z2 = z * z
    denom = 1.0 + z2 / trials
    center = (p + z2 / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / denom
    # At 0/n and n/n the closed form is exactly 0 and 1; rounding would leave 1 - 1e-16, which
    # reads as "a perfect score is outside the interval".
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == trials else min(1.0, center + half)
    return (lo, hi)


def bootstrap_interval(
    values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `values`: draw len(values) values with
    replacement n_resamples times, and take the (1 - confidence)/2 and (1 + confidence)/2
    quantiles of the resampled means.

    The values are per-prompt scores (a prompt's share of correct samples, its pass@k, ...), so
    a prompt's samples are resampled together, as the one independent unit they are.
    Deterministic for a seed. One value gives (v, v); none gives (nan, nan).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap_interval: confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"bootstrap_interval: n_resamples must be >= 1, got {n_resamples}")
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"bootstrap_interval: values must be one-dimensional, got {v.shape}")
    if np.isnan(v).any():
        raise ValueError("bootstrap_interval: values contain NaN")
    if v.size == 0:
        return (math.nan, math.nan)
    if v.size == 1:
        return (float(v[0]), float(v[0]))
    rng = np.random.default_rng(seed)
    # Resample in batches so that many prompts times many resamples stays in bounded memory.
    batch = max(1, _BOOTSTRAP_CELLS // v.size)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, batch):
        stop = min(start + batch, n_resamples)
        idx = rng.integers(0, v.size, size=(stop - start, v.size))
        means[start:stop] = v[idx].mean(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


@dataclass(frozen=True)
class PromptOutcome:
    """One prompt's grades: n samples, c of them correct, and how many had no extractable answer
    (those are among the n - c incorrect ones)."""

    n: int
    c: int
    n_extraction_failures: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"PromptOutcome: n must be >= 1, got {self.n}")
        if not 0 <= self.c <= self.n:
            raise ValueError(f"PromptOutcome: c must be in [0, {self.n}], got {self.c}")
        if not 0 <= self.n_extraction_failures <= self.n - self.c:
            raise ValueError(
                "PromptOutcome: extraction failures must be in [0, n - c] "
                f"(a failed extraction is never correct), got {self.n_extraction_failures} "
                f"with n={self.n}, c={self.c}"
            )


def summarize(
    outcomes: Sequence[PromptOutcome],
    k: int | None = None,
    interval: Literal["wilson", "bootstrap"] = "bootstrap",
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The headline numbers of an evaluation, every prompt sampled the same n times.

        mean_at_n = mean over prompts of c / n          (accuracy, every sample counted)
        pass_at_k = mean over prompts of pass_at_k(n, c, k), k = n by default

    Intervals at `confidence`:
      bootstrap  resamples prompts (bootstrap_interval of the per-prompt values), for both.
      wilson     mean@n: wilson_interval(total correct, total samples), i.e. samples pooled as
                 independent trials (narrower than the bootstrap when prompts differ in
                 difficulty); pass@k with k == n: wilson_interval(prompts with a correct sample,
                 prompts). For k < n the per-prompt pass@k is not a 0/1 outcome, so its interval
                 is the bootstrap even here; `pass_at_k_interval_method` says which was used.

    Returns a dict: prompts, samples, n, k, correct, mean_at_n, mean_at_n_interval (lo, hi),
    pass_at_k, pass_at_k_interval (lo, hi), interval, pass_at_k_interval_method, confidence,
    extraction_failures (count over all samples) and extraction_failure_rate (per sample).
    """
    if not outcomes:
        raise ValueError("summarize: no outcomes")
    if interval not in ("wilson", "bootstrap"):
        raise ValueError(f"summarize: interval must be 'wilson' or 'bootstrap', got {interval!r}")
    ns = {o.n for o in outcomes}
    if len(ns) != 1:
        raise ValueError(f"summarize: every prompt needs the same n, got n in {sorted(ns)}")
    (n,) = ns
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"summarize: k must be in [1, n={n}], got {k}")
    prompts = len(outcomes)
    samples = prompts * n
    correct = sum(o.c for o in outcomes)
    failures = sum(o.n_extraction_failures for o in outcomes)
    per_prompt = np.array([o.c / n for o in outcomes], dtype=np.float64)
    per_prompt_pass = np.array([pass_at_k(n, o.c, k) for o in outcomes], dtype=np.float64)

    def boot(values: np.ndarray) -> tuple[float, float]:
        return bootstrap_interval(values.tolist(), confidence, n_resamples, seed)

    if interval == "wilson":
        z = NormalDist().inv_cdf(0.5 + confidence / 2)
        mean_ci = wilson_interval(correct, samples, z)
        if k == n:
            pass_ci = wilson_interval(sum(o.c > 0 for o in outcomes), prompts, z)
            pass_method = "wilson"
        else:
            pass_ci = boot(per_prompt_pass)
            pass_method = "bootstrap"
    else:
        mean_ci = boot(per_prompt)
        pass_ci = boot(per_prompt_pass)
        pass_method = "bootstrap"

    return {
        "prompts": prompts,
        "samples": samples,
        "n": n,
        "k": k,
        "correct": correct,
        "mean_at_n": float(per_prompt.mean()),
        "mean_at_n_interval": mean_ci,
        "pass_at_k": float(per_prompt_pass.mean()),
        "pass_at_k_interval": pass_ci,
        "interval": interval,
        "pass_at_k_interval_method": pass_method,
        "confidence": confidence,
        "extraction_failures": failures,
        "extraction_failure_rate": failures / samples,
    }


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """The area under the ROC curve: the probability that a random positive scores above a
    random negative, ties counting 1/2,

        AUROC = U / (n_pos * n_neg),  U = sum of the positives' ranks - n_pos (n_pos + 1) / 2,

    the Mann-Whitney U with average ranks for ties, so O(n log n) rather than comparing every
    pair. Used to ask whether a per-rollout signal (a teacher score, a divergence) separates
    correct from incorrect answers. NaN scores raise ValueError (an undefined signal must be
    dealt with, not ranked); if every label is the same there is no pair to compare and the
    result is nan.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"auroc: scores {s.shape} and labels {y.shape} must be equal 1-D")
    if np.isnan(s).any():
        raise ValueError("auroc: scores contain NaN")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # 1-based average rank of each distinct value: its last rank minus half its extra ties.
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = average_rank[inverse.reshape(-1)]
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def gap_recovery(acc_before: float, acc_after: float, acc_teacher: float) -> float:
    """The share of the student-teacher gap that training closed:

        (after - before) / (teacher - before).

    1 means the student reached the teacher, 0 no change; it is negative when the student got
    worse and above 1 when it overtook the teacher. nan when teacher == before: there was no
    gap to recover, so no share of it is meaningful.
    """
    gap = acc_teacher - acc_before
    if gap == 0:
        return math.nan
    return (acc_after - acc_before) / gap
