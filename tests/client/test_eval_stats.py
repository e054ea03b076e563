"""The evaluation statistics against their textbook formulas, written out directly here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from opd.client.evaluation.stats import (
    PromptOutcome,
    auroc,
    bootstrap_interval,
    gap_recovery,
    pass_at_k,
    summarize,
    wilson_interval,
)

# --- pass@k ----------------------------------------------------------------------------------


def _pass_at_k_comb(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_matches_binomials() -> None:
    cases = [
        (n, c, k) for n in (1, 2, 3, 5, 8, 16, 50) for c in range(n + 1) for k in range(1, n + 1)
    ]
    for n, c, k in cases:
        assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_comb(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges() -> None:
    for n in (1, 4, 10, 100):
        assert pass_at_k(n, 0, 1) == 0.0
        assert pass_at_k(n, 0, n) == 0.0
        assert pass_at_k(n, n, 1) == 1.0
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)
            assert pass_at_k(n, c, n) == (1.0 if c > 0 else 0.0)
    # large n: binomials overflow floats, the product form does not
    assert pass_at_k(2000, 3, 100) == pytest.approx(_pass_at_k_comb(2000, 3, 100), rel=1e-12)


def test_pass_at_k_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c must be"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(4, 1, 0)


# --- Wilson ----------------------------------------------------------------------------------


def _wilson_direct(s: int, n: int, z: float) -> tuple[float, float]:
    p = s / n
    center = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = (z / (1 + z**2 / n)) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return center - half, center + half


@pytest.mark.parametrize(
    ("s", "n"), [(0, 1), (1, 1), (0, 10), (10, 10), (3, 10), (8, 10), (50, 100), (1, 1000)]
)
@pytest.mark.parametrize("z", [1.0, 1.959963984540054, 2.5758293035489004])
def test_wilson_matches_closed_form(s: int, n: int, z: float) -> None:
    lo, hi = wilson_interval(s, n, z)
    want_lo, want_hi = _wilson_direct(s, n, z)
    assert lo == pytest.approx(max(0.0, want_lo), abs=1e-12)
    assert hi == pytest.approx(min(1.0, want_hi), abs=1e-12)
    assert 0.0 <= lo <= s / n <= hi <= 1.0


def test_wilson_textbook_value_and_edges() -> None:
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=5e-5)
    assert hi == pytest.approx(0.9433, abs=5e-5)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(-1, 10)


# --- bootstrap -------------------------------------------------------------------------------


def test_bootstrap_deterministic_and_contains_the_mean() -> None:
    rng = np.random.default_rng(1)
    values = rng.random(60).tolist()
    a = bootstrap_interval(values, seed=3)
    assert a == bootstrap_interval(values, seed=3)
    assert a != bootstrap_interval(values, seed=4)
    assert a[0] < float(np.mean(values)) < a[1]
    narrow = bootstrap_interval(values, confidence=0.5)
    wide = bootstrap_interval(values, confidence=0.99)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_bootstrap_narrows_with_more_prompts() -> None:
    rng = np.random.default_rng(0)
    small = bootstrap_interval((rng.random(20) < 0.5).astype(float).tolist())
    large = bootstrap_interval((rng.random(2000) < 0.5).astype(float).tolist())
    assert large[1] - large[0] < (small[1] - small[0]) / 4


def test_bootstrap_degenerate_inputs() -> None:
    assert bootstrap_interval([0.25]) == (0.25, 0.25)
    assert bootstrap_interval([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_interval([]))
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_interval([0.1, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval([0.1, 0.2], confidence=1.0)


# --- AUROC -----------------------------------------------------------------------------------


def _auroc_pairs(scores: list[float], labels: list[bool]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(8))
def test_auroc_matches_pairwise_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 80))
    scores = rng.integers(0, 5, size=size).astype(float).tolist()  # many ties
    labels = (rng.random(size) < 0.4).tolist()
    labels[0], labels[1] = True, False  # both classes present
    assert auroc(scores, labels) == pytest.approx(_auroc_pairs(scores, labels), abs=1e-12)


def test_auroc_extremes() -> None:
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auroc([0.5] * 6, [True, False] * 3) == 0.5
    assert auroc([-math.inf, math.inf], [False, True]) == 1.0
    assert math.isnan(auroc([0.1, 0.2], [True, True]))
    assert math.isnan(auroc([0.1, 0.2], [False, False]))
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.1, float("nan")], [True, False])
    with pytest.raises(ValueError):
        auroc([0.1, 0.2], [True])


# --- gap recovery ----------------------------------------------------------------------------


def test_gap_recovery_examples() -> None:
    assert gap_recovery(0.2, 0.5, 0.8) == pytest.approx(0.5)
    assert gap_recovery(0.2, 0.8, 0.8) == pytest.approx(1.0)
    assert gap_recovery(0.2, 0.2, 0.8) == 0.0
    assert gap_recovery(0.4, 0.3, 0.6) == pytest.approx(-0.5)  # got worse
    assert gap_recovery(0.4, 0.7, 0.6) == pytest.approx(1.5)  # overtook the teacher
    assert math.isnan(gap_recovery(0.5, 0.7, 0.5))  # no gap to recover


# --- summarize -------------------------------------------------------------------------------

OUTCOMES = [
    PromptOutcome(n=4, c=4),
    PromptOutcome(n=4, c=2, n_extraction_failures=1),
    PromptOutcome(n=4, c=0, n_extraction_failures=3),
    PromptOutcome(n=4, c=1),
]


def test_summarize_by_hand_wilson() -> None:
    s = summarize(OUTCOMES, interval="wilson")
    assert s["prompts"] == 4 and s["samples"] == 16 and s["n"] == 4 and s["k"] == 4
    assert s["correct"] == 7
    assert s["mean_at_n"] == pytest.approx((1 + 0.5 + 0 + 0.25) / 4)
    assert s["pass_at_k"] == pytest.approx(3 / 4)  # k = n: prompts with any correct sample
    assert s["mean_at_n_interval"] == pytest.approx(wilson_interval(7, 16))
    assert s["pass_at_k_interval"] == pytest.approx(wilson_interval(3, 4))
    assert s["pass_at_k_interval_method"] == "wilson"
    assert s["extraction_failures"] == 4
    assert s["extraction_failure_rate"] == pytest.approx(4 / 16)


def test_summarize_by_hand_bootstrap_and_k() -> None:
    s = summarize(OUTCOMES, k=2)
    # pass@2 per prompt: 1, 1 - C(2,2)/C(4,2) = 5/6, 0, 1 - C(3,2)/C(4,2) = 1/2
    assert s["pass_at_k"] == pytest.approx((1 + 5 / 6 + 0 + 1 / 2) / 4)
    per_prompt = [1.0, 0.5, 0.0, 0.25]
    assert s["mean_at_n_interval"] == bootstrap_interval(per_prompt)
    assert s["pass_at_k_interval"] == pytest.approx(bootstrap_interval([1.0, 5 / 6, 0.0, 0.5]))
    assert s["interval"] == "bootstrap" and s["pass_at_k_interval_method"] == "bootstrap"
    # wilson for k < n still bootstraps pass@k, and says so
    w = summarize(OUTCOMES, k=2, interval="wilson")
    assert w["pass_at_k_interval_method"] == "bootstrap"
    assert w["pass_at_k_interval"] == s["pass_at_k_interval"]
    # k = 1 is mean@n
    assert summarize(OUTCOMES, k=1)["pass_at_k"] == pytest.approx(s["mean_at_n"])


def test_summarize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same n"):
        summarize([PromptOutcome(4, 1), PromptOutcome(3, 1)])
    with pytest.raises(ValueError, match="k must be"):
        summarize(OUTCOMES, k=5)
    with pytest.raises(ValueError, match="no outcomes"):
        summarize([])
    with pytest.raises(ValueError, match="never correct"):
        PromptOutcome(n=4, c=3, n_extraction_failures=2)
