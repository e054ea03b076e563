"""Health checks of `opd report`: the paper's failure signature as ok / warning / n/a verdicts.

The paper (docs/method.md, diagnostics) sees failing OPD as: overlap flat,
overlap-token advantage stuck negative, entropy gap not closing, small gradient norm from the
start. To those this adds student entropy blowing up or collapsing (the quickstart's failing
student-top-k run, docs/training.md), truncated rollouts rising and overlap falling at the
deepest positions (the paper's long-horizon degradation).

Each check compares the mean of a metric over the first and the last WINDOW_FRAC of the logged
steps (nan steps ignored) and reports the two numbers with the rule that decided. Thresholds are
the constants below, each with the measurement it comes from. A check is n/a when its metric is
missing or there are fewer than 2 steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np

    from opd.client.report.inputs import Series

__all__ = ["Check", "Windows", "health_checks", "span", "window_slices", "windows"]

# Early vs late = the mean over the first and the last 20% of logged steps: enough steps to
# average out step-to-step noise on long runs, still clearly "start" and "end" of the run.
WINDOW_FRAC = 0.2
# Overlap "rises" if it gains at least 0.01 (absolute). The paper's good runs climb ~0.19
# (72% -> 91%), the quickstart's held-out overlap gains 0.05 in 16 steps; less is flat.
OVERLAP_MIN_RISE = 0.01
# ... unless it already ends this high: the paper's successful runs end above 0.91, and a run
# near the ceiling has no room left to climb.
OVERLAP_HIGH = 0.90
# The overlap-token advantage is "near 0" (aligned) above -0.05 nats; the quickstart's 24-layer
# student starts at -0.15 and the paper calls large negative values over-confidence.
ADVANTAGE_NEAR_ZERO = -0.05
# ... otherwise it must move toward 0 by at least 10% of its first value (the quickstart's
# healthy run, held out: -0.152 -> -0.121, 20%); less is "stuck negative".
ADVANTAGE_MIN_RECOVERY = 0.10
# The entropy gap "closes" if it shrinks by at least 5% (the quickstart's healthy run: 1.48 ->
# 1.36, 8%; its failing student-top-k run widened to 1.93), or is already below 0.1 nats.
GAP_MIN_CLOSE = 0.05
GAP_CLOSED = 0.1
# Pre-clip gradient norm below this over the first window = "small from the start" (paper's
# failure signature). Absolute, hence scale-dependent: the token-mean losses of opd give norms of
# 0.1-100 on the models tried (the clip is at 1.0 by default); 1e-2 means almost no signal.
GRAD_NORM_SMALL = 1e-2
# Student entropy "blows up" if it grows by 25% and ends above the teacher's: the quickstart's
# failing student-top-k run went 4.9 -> 6.8 (x1.38), a 10-layer student 4.4 -> 9.5; the healthy
# run moved by 2%.
ENTROPY_BLOWUP_RATIO = 1.25
# ... and "collapses" if it halves and ends below the teacher's, or falls under 0.05 nats (a
# near-deterministic student; the paper warns that teacher-aligned prompts can collapse entropy).
ENTROPY_COLLAPSE_RATIO = 0.5
ENTROPY_COLLAPSED = 0.05
# Truncated rollouts (hit --max-new-tokens) rising by 10 points: responses get longer or loop,
# where the paper sees OPD degrade (long horizons).
TRUNCATION_MAX_RISE = 0.10

Status = Literal["ok", "warning", "n/a"]


@dataclass(frozen=True)
class Check:
    name: str  # what a healthy run does, e.g. "overlap rises"
    status: Status
    message: str  # the finding in plain language
    numbers: str  # the values (first vs last window) and the rule that decided it


CheckFn = Callable[["Series", float], Check]


def window_slices(n: int, frac: float = WINDOW_FRAC) -> tuple[slice, slice]:
    """Rows of the first and the last `frac` of n steps: at least 1 each; disjoint for n >= 2."""
    w = max(1, min(round(frac * n), n // 2))
    return slice(0, w), slice(n - w, n)


@dataclass(frozen=True)
class Windows:
    """First/last window means of one column of a Series."""

    first: float
    last: float
    label: str  # "steps 1-2 vs 9-10"

    @property
    def change(self) -> float:
        return self.last - self.first


def windows(series: Series, key: str, frac: float = WINDOW_FRAC) -> Windows | None:
    """Means of `key` over the first and the last window; None without data in both."""
    import numpy as np

    col = series.get(key)
    if col is None or len(series) < 2:
        return None
    a, b = window_slices(len(series), frac)
    first, last = col[a], col[b]
    if not (np.isfinite(first).any() and np.isfinite(last).any()):
        return None
    s = series.steps_S
    label = f"steps {span(s[a])} vs {span(s[b])}"
    return Windows(float(np.nanmean(first)), float(np.nanmean(last)), label)


def span(steps: np.ndarray) -> str:
    """'3' or '3-7': the steps of a window."""
    return f"{steps[0]}" if steps.size == 1 else f"{steps[0]}-{steps[-1]}"


def _g(x: float) -> str:
    return f"{x:.4g}"


def _na(name: str, why: str) -> Check:
    return Check(name, "n/a", why, "")


def _trend(w: Windows, key: str) -> str:
    return f"{key}: {_g(w.first)} -> {_g(w.last)} ({w.change:+.4g}; {w.label})"


# What a windowed check finds: its status, the finding, and what its numbers add after the
# trend (the rule that decided, and any further values).
Verdict = tuple[Status, str, str]
WindowedJudge = Callable[[Windows, "Series", float], Verdict]


def _windowed(name: str, key: str) -> Callable[[WindowedJudge], CheckFn]:
    """A check on the first and last windows of `key`: n/a without them, else the decorated
    judge's verdict, with the trend of `key` leading its numbers."""

    def wrap(judge: WindowedJudge) -> CheckFn:
        def check(series: Series, frac: float) -> Check:
            w = windows(series, key, frac)
            if w is None:
                return _na(name, f"needs {key} over at least 2 steps")
            status, message, tail = judge(w, series, frac)
            return Check(name, status, message, _trend(w, key) + tail)

        return check

    return wrap


@_windowed("overlap ratio rises", "overlap/ratio")
def _check_overlap(w: Windows, series: Series, frac: float) -> Verdict:
    rule = f"; ok if change >= +{OVERLAP_MIN_RISE} or last >= {OVERLAP_HIGH}"
    if w.change >= OVERLAP_MIN_RISE:
        return "ok", "The student puts more of its top-k where the teacher does.", rule
    if w.last >= OVERLAP_HIGH:
        return "ok", "Overlap is flat but already near the ceiling.", rule
    msg = (
        "Overlap is flat or falling: the student is not moving its top tokens toward the "
        "teacher's. This is the paper's main sign of an incompatible pair."
    )
    return "warning", msg, rule


@_windowed("overlap-token advantage moves toward 0", "overlap/token_advantage")
def _check_advantage(w: Windows, series: Series, frac: float) -> Verdict:
    recovery = w.change / abs(w.first) if w.first < 0 else math.inf
    rule = (
        f"; ok if last >= {ADVANTAGE_NEAR_ZERO} or it recovers >= {ADVANTAGE_MIN_RECOVERY:.0%} "
        f"of its first value toward 0 (here {recovery:.0%})"
    )
    if w.last >= ADVANTAGE_NEAR_ZERO:
        msg = "On the shared top tokens the student and teacher agree (advantage near 0)."
        return "ok", msg, rule
    if recovery >= ADVANTAGE_MIN_RECOVERY:
        return "ok", "Still negative, but moving toward 0.", rule
    msg = (
        "Stuck negative: on the tokens both favour, the student stays over-confident relative "
        "to the teacher."
    )
    return "warning", msg, rule


@_windowed("entropy gap closes", "entropy/gap")
def _check_gap(w: Windows, series: Series, frac: float) -> Verdict:
    rule = f"; ok if it shrinks >= {GAP_MIN_CLOSE:.0%} or last < {GAP_CLOSED} nats"
    if w.last < GAP_CLOSED:
        return "ok", "The student's uncertainty matches the teacher's.", rule
    if w.last <= w.first * (1 - GAP_MIN_CLOSE):
        return "ok", "The student's entropy is converging to the teacher's.", rule
    msg = (
        "The entropy gap is not closing: the student is not becoming as (un)certain as the teacher."
    )
    return "warning", msg, rule


def _check_grad_norm(series: Series, frac: float) -> Check:
    import numpy as np

    name = "gradient norm is not tiny from the start"
    col = series.get("train/grad_norm")
    if col is None:
        return _na(name, "needs train/grad_norm")
    a, _ = window_slices(len(series), frac)
    first = float(np.nanmean(col[a]))
    numbers = (
        f"train/grad_norm over steps {span(series.steps_S[a])}: {_g(first)}; "
        f"ok if >= {GRAD_NORM_SMALL}"
    )
    if first >= GRAD_NORM_SMALL:
        return Check(name, "ok", "The objective gives the student a real gradient.", numbers)
    msg = (
        "The gradient is tiny from the first steps: the teacher's signal barely moves the student."
    )
    return Check(name, "warning", msg, numbers)


@_windowed("student entropy neither blows up nor collapses", "entropy/student")
def _check_student_entropy(w: Windows, series: Series, frac: float) -> Verdict:
    teacher = windows(series, "entropy/teacher", frac)
    t_last = teacher.last if teacher else None
    ratio = w.last / w.first if w.first > 0 else math.inf
    numbers = f", x{ratio:.3g}"
    if teacher:
        numbers += f"; teacher entropy, last window {_g(teacher.last)}"
    numbers += (
        f"; warning if x >= {ENTROPY_BLOWUP_RATIO} ending above the teacher, x <= "
        f"{ENTROPY_COLLAPSE_RATIO} ending below it, or last < {ENTROPY_COLLAPSED}"
    )
    if ratio >= ENTROPY_BLOWUP_RATIO and (t_last is None or w.last > t_last):
        msg = (
            "Student entropy is blowing up: it flattens instead of matching the teacher "
            "(the failure the quickstart shows for student top-k on a distant pair)."
        )
        return "warning", msg, numbers
    collapsing = ratio <= ENTROPY_COLLAPSE_RATIO and (t_last is None or w.last < t_last)
    if collapsing or w.last < ENTROPY_COLLAPSED:
        msg = "Student entropy is collapsing: it is becoming near-deterministic."
        return "warning", msg, numbers
    return "ok", "Student entropy stays in a sane range.", numbers


@_windowed("truncated rollouts do not rise", "rollout/truncated_frac")
def _check_truncation(w: Windows, series: Series, frac: float) -> Verdict:
    rule = f"; ok if change < +{TRUNCATION_MAX_RISE}"
    if w.change < TRUNCATION_MAX_RISE:
        return "ok", "Rollout lengths are stable.", rule
    msg = (
        "More rollouts hit --max-new-tokens: responses grow longer or loop, where OPD's "
        "token reward degrades."
    )
    return "warning", msg, rule


def _check_deep_overlap(series: Series, frac: float) -> Check:
    import numpy as np

    name = "overlap at the deepest positions does not fall"
    buckets, m_SB = series.depth_matrix("overlap/ratio")
    if len(buckets) < 2 or len(series) < 2:
        return _na(name, "needs overlap/ratio in 2 or more depth buckets over 2 or more steps")
    a, b = window_slices(len(series), frac)
    for j in reversed(range(len(buckets))):  # the deepest bucket seen in both windows
        first, last = m_SB[a, j], m_SB[b, j]
        if np.isfinite(first).any() and np.isfinite(last).any():
            break
    else:
        return _na(name, "no depth bucket has values in both windows")
    f, lst = float(np.nanmean(first)), float(np.nanmean(last))
    lo, hi = buckets[j]
    numbers = (
        f"overlap/ratio@depth{lo}-{hi}: {_g(f)} -> {_g(lst)} ({lst - f:+.4g}); "
        f"ok if change > -{OVERLAP_MIN_RISE}"
    )
    if lst - f > -OVERLAP_MIN_RISE:
        return Check(name, "ok", "The ends of the responses hold up.", numbers)
    msg = (
        "Overlap falls at the end of the responses: the paper sees instability start there and "
        "move toward the start."
    )
    return Check(name, "warning", msg, numbers)


_CHECKS = (
    _check_overlap,
    _check_advantage,
    _check_gap,
    _check_grad_norm,
    _check_student_entropy,
    _check_truncation,
    _check_deep_overlap,
)


def health_checks(series: Series, frac: float = WINDOW_FRAC) -> list[Check]:
    """The paper's failure signature as ok / warning / n/a checks on a run's metrics."""
    return [check(series, frac) for check in _CHECKS]
