"""The plots of `opd report`: one PNG per figure, drawn by matplotlib's Agg backend.

Each figure is skipped when its keys are absent from the inputs, and returned as a Plot whose
caption says how to read it (html.py shows it under the image). The figure primitives (Plot,
Panel, matplotlib figures, series panels, colours) are in figures.py; the per-teacher and the
outcome figures in teacher_view.py and outcome_view.py. matplotlib and numpy are imported
inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opd.client.report.figures import (
    GREEN,
    GREY,
    ORANGE,
    RED,
    SMOOTH_ABOVE,
    Panel,
    Plot,
    figure,
    panel_grid,
    save,
    series_figure,
)
from opd.client.report.health import span, window_slices
from opd.client.report.inputs import DEPTH, TURN, Breakdown, RunInputs, Series, num
from opd.client.report.labels import MAIN_METRICS
from opd.client.report.outcome_view import outcome_plots
from opd.client.report.teacher_view import teacher_plots

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes

_LABELS = {key: label for key, label, _ in MAIN_METRICS}


def all_plots(inputs: RunInputs, out_dir: Path, frac: float) -> list[Plot]:
    plots: list[Plot] = []
    if inputs.metrics is not None:
        plots += step_plots(inputs.metrics, out_dir, frac)
        plots += depth_plots(inputs.metrics, out_dir, frac)
        plots += turn_plots(inputs.metrics, out_dir, frac)
        plots += teacher_plots(inputs.metrics, out_dir, frac)
    if inputs.probe is not None:
        plots += probe_plots(inputs.probe, out_dir)
    plots += coldstart_plots(inputs.coldstart, inputs.sft, out_dir)
    plots += outcome_plots(inputs, out_dir)
    return plots


# --------------------------------------------------------------------------------------------
# metrics.jsonl: over steps
# --------------------------------------------------------------------------------------------

_WINDOWS_NOTE = " Grey bands: the early and late windows that the health checks compare."


def step_plots(series: Series, out_dir: Path, frac: float) -> list[Plot]:
    """The figures over steps (section "steps"), each where its keys were logged. The episodes'
    own figure (episode/*: turns, endings, reward) is one of them, not in "By turn": these are
    one number per step like the others, not one per turn; they are logged for episodes of a
    single turn too, which have no by-turn breakdown; and they extend the rollout length and
    truncation figure next to them."""
    figures = [
        (
            "kl",
            "Reverse KL to the teacher",
            "KL(student || teacher) per token on the student's own rollouts, in nats: it should "
            "fall. kl/sampled is the unbiased single-sample estimate (noisy); the top-k forms sum "
            "over the student's top-k. A falling KL alone is not enough: a student can lower it "
            "by flattening its distribution, which the entropy plot shows.",
            [
                Panel(
                    "reverse KL (nats/token)",
                    [
                        ("kl/sampled", "sampled token"),
                        ("kl/student_topk", "student top-k"),
                        ("kl/student_topk_renorm", "student top-k, renormalised"),
                    ],
                )
            ],
        ),
        (
            "overlap_ratio",
            "Top-k overlap",
            "The share of the student's top-k tokens that are also in the teacher's top-k. In "
            "successful runs it climbs (paper: ~0.72 to above 0.91); flat or falling overlap is "
            "the main sign of an incompatible student/teacher pair. empty_frac is the share of "
            "positions where the two top-k sets share nothing.",
            [
                Panel(
                    "overlap",
                    [("overlap/ratio", "overlap ratio"), ("overlap/empty_frac", "empty fraction")],
                )
            ],
        ),
        (
            "overlap_advantage",
            "Overlap-token advantage",
            "On the tokens both models rank in their top-k, sum of p (log q - log p) with both "
            "renormalised there. Near 0 means aligned; strongly negative means the student is "
            "over-confident where the teacher is not. Healthy runs move it toward 0; stuck "
            "negative is a failure sign.",
            [
                Panel(
                    "overlap-token advantage (nats)",
                    [("overlap/token_advantage", "advantage")],
                    zero_line=True,
                )
            ],
        ),
        (
            "entropy",
            "Entropies and the entropy gap",
            "Full-vocabulary entropies of student and teacher on the student's rollouts (left) "
            "and their gap (right): mean |H(q) - H(p)| and the signed mean H(q) - H(p) (> 0: the "
            "student is sharper). The gap should close. A student entropy that climbs far above "
            "the teacher's is the student flattening (blow-up); one that drops toward 0 is "
            "collapse.",
            [
                Panel(
                    "entropy (nats)",
                    [("entropy/student", "student"), ("entropy/teacher", "teacher")],
                ),
                Panel(
                    "entropy gap (nats)",
                    [("entropy/gap", "|H(q) - H(p)|"), ("entropy/signed_gap", "H(q) - H(p)")],
                    zero_line=True,
                ),
            ],
        ),
        (
            "overlap_mass",
            "Overlap mass",
            "Probability that student (p) and teacher (q) put on the shared top-k tokens, not "
            "renormalised. In the paper's runs both stay near 0.97-0.99; low or falling mass "
            "means the overlap-based signals cover little of either distribution.",
            [
                Panel(
                    "mass on shared top-k",
                    [("overlap/mass_student", "student"), ("overlap/mass_teacher", "teacher")],
                )
            ],
        ),
        (
            "reward",
            "Sequence reward",
            "Mean over each rollout of log q(y_t) - log p(y_t) (minus the per-token reverse KL), "
            "averaged over the step's rollouts; the band is +-1 standard deviation over "
            "rollouts. It should rise toward 0.",
            [
                Panel(
                    "sequence mean reward",
                    [("reward/seq_mean", "mean over rollouts")],
                    zero_line=True,
                    band={"reward/seq_mean": "reward/seq_std"},
                )
            ],
        ),
        (
            "optimisation",
            "Loss, gradient norm, learning rate",
            "The objective's loss, the gradient norm before clipping (log scale) and the "
            "learning rate. A gradient norm that is tiny from the start is a failure sign: the "
            "teacher's signal does not move the student. Spikes in loss or gradient norm point "
            "at instability.",
            [
                Panel("train/loss", [("train/loss", "loss")]),
                Panel("train/grad_norm", [("train/grad_norm", "pre-clip norm")], log_y=True),
                Panel("train/lr", [("train/lr", "learning rate")]),
            ],
        ),
        (
            "rollouts",
            "Rollout length and truncation",
            "The share of rollouts cut at --max-new-tokens and the mean completion length. "
            "Rising truncation means responses grow longer or loop; the paper sees OPD's token "
            "reward degrade on long responses.",
            [
                Panel("truncated fraction", [("rollout/truncated_frac", "truncated")]),
                Panel("completion length", [("tokens/mean_completion_len", "tokens/rollout")]),
            ],
        ),
        (
            "episodes",
            "Episodes: turns, endings, reward",
            "Multi-turn episodes (--env): assistant turns per episode (mean and longest), how "
            "episodes ended and the environment's mean reward where it gives one. Truncated is "
            "the share stopped by a limit rather than by the environment, split into "
            "--max-turns, a turn that hit --max-new-tokens and --max-episode-tokens. Rising "
            "truncation or turn counts at the limit mean episodes run long or loop; the "
            "environment's reward is the outcome the teacher's per-token signal should "
            "raise.",
            [
                Panel(
                    "assistant turns",
                    [("episode/turns_mean", "mean"), ("episode/turns_max", "longest")],
                ),
                Panel(
                    "share of episodes",
                    [
                        ("episode/truncated_frac", "truncated"),
                        ("episode/ended_max_turns_frac", "at --max-turns"),
                        ("episode/ended_turn_tokens_frac", "turn hit --max-new-tokens"),
                        ("episode/ended_episode_tokens_frac", "at --max-episode-tokens"),
                    ],
                ),
                Panel("episode length", [("episode/tokens_mean", "tokens/episode")]),
                Panel("environment reward", [("episode/reward_mean", "mean over episodes")]),
            ],
        ),
        (
            "time",
            "Time and throughput",
            "Seconds per step spent sampling (generate), waiting for the teacher (score_wait) "
            "and updating (train), and completion tokens per second. A large score_wait means "
            "the teacher service is the bottleneck.",
            [
                Panel(
                    "seconds per step",
                    [
                        ("time/step_s", "step"),
                        ("time/generate_s", "generate"),
                        ("time/score_wait_s", "score wait"),
                        ("time/train_s", "train"),
                    ],
                ),
                Panel("throughput", [("throughput/tokens_per_s", "tokens/s")]),
            ],
        ),
    ]
    plots: list[Plot] = []
    for name, title, caption, panels in figures:
        plots += series_figure(series, out_dir, frac, name, title, caption + _WINDOWS_NOTE, panels)
    return plots


# --------------------------------------------------------------------------------------------
# metrics.jsonl: by depth and by assistant turn
# --------------------------------------------------------------------------------------------

DEPTH_KEYS = (
    "overlap/ratio",
    "overlap/token_advantage",
    "entropy/gap",
    "kl/sampled",
    "overlap/mass_student",
    "reward/seq_mean",
)
HEATMAP_KEYS = ("overlap/ratio", "overlap/token_advantage", "entropy/gap")
_LOWER_IS_BETTER = frozenset({"entropy/gap", "kl/sampled"})


TURN_KEYS = ("overlap/ratio", "overlap/token_advantage", "kl/sampled", "entropy/gap")
_ZERO_LINE = frozenset({"overlap/token_advantage", "reward/seq_mean"})


def _style_parts_axis(ax: Axes, key: str, labels: Sequence[tuple[int, ...]], by: Breakdown) -> None:
    """Title, ticks of the parts (depth buckets, turns), grid and legend of one panel."""
    ax.set_title(_LABELS.get(key, key), fontsize=10)
    _parts_axis(ax, labels, by)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _parts_axis(ax: Axes, labels: Sequence[tuple[int, ...]], by: Breakdown) -> None:
    step = max(1, math.ceil(len(labels) / 8))  # at most 8 tick labels
    ticks = list(range(0, len(labels), step))
    texts = [by.tick(labels[i]) for i in ticks]
    long = max(map(len, texts)) * len(texts) > 40  # would run into each other: slant them
    ax.set_xticks(
        ticks, texts, fontsize=7, rotation=30 if long else 0, ha="right" if long else "center"
    )
    ax.set_xlabel(by.axis, fontsize=9)


def depth_plots(series: Series, out_dir: Path, frac: float) -> list[Plot]:
    """Early vs late profile over depth, and a steps x depth heatmap; needs >= 2 buckets."""
    return breakdown_plots(
        series,
        out_dir,
        frac,
        DEPTH,
        DEPTH_KEYS,
        (
            "Diagnostics by depth: early vs late steps",
            "Each metric per bucket of completion positions, averaged over the early and the "
            "late window of steps. Healthy: the late line is better than the early one at every "
            "depth. The paper sees instability start at the end of long responses and move "
            "toward the start: watch the right-hand buckets first.",
        ),
        (
            "Diagnostics over steps x depth",
            "Rows are depth buckets (start of the response at the bottom), columns are steps; "
            "blank cells had no positions at that depth. In every panel brighter is better: "
            "higher overlap, advantage nearer 0, smaller entropy gap. A healthy run brightens "
            "from left to right in every row; a failing one darkens first in the top (deepest) "
            "rows.",
        ),
    )


def turn_plots(series: Series, out_dir: Path, frac: float) -> list[Plot]:
    """Episodes (--env): early vs late profile over the assistant turn, and a steps x turn
    heatmap, from the `key@turn{j}` columns; needs episodes of >= 2 turns."""
    return breakdown_plots(
        series,
        out_dir,
        frac,
        TURN,
        TURN_KEYS,
        (
            "Diagnostics by assistant turn: early vs late steps",
            "Each metric on the positions of assistant turn j of the episodes (0: the first "
            "reply), averaged over the early and the late window of steps. Healthy: the late "
            "line is better than the early one at every turn. A teacher whose signal holds on "
            "the first turn but fades on later ones (overlap falling, KL or entropy gap "
            "growing with j) teaches little about acting on tool results and follow-ups.",
        ),
        (
            "Diagnostics over steps x turn",
            "Rows are assistant turns (the first at the bottom), columns are steps; blank cells "
            "had no episode that long. In every panel brighter is better: higher overlap, "
            "advantage nearer 0, smaller entropy gap. A healthy run brightens from left to "
            "right in every row; a teacher that only helps early in an episode leaves the top "
            "(late-turn) rows dark.",
        ),
    )


def breakdown_plots(
    series: Series,
    out_dir: Path,
    frac: float,
    by: Breakdown,
    keys: Sequence[str],
    profile: tuple[str, str],
    heatmap: tuple[str, str],
) -> list[Plot]:
    """The figures of one breakdown (DEPTH or TURN), section `by.name`: each key of `keys` with
    >= 2 parts averaged over the early and the late window ("{name}_profile"), and HEATMAP_KEYS
    over steps x parts ("{name}_heatmap"); profile and heatmap are (title, caption)."""
    import numpy as np

    keys = [k for k in keys if len(by.labels(series.columns, k)) >= 2]
    if not keys or len(series) < 1:
        return []
    plots = []
    a, b = window_slices(len(series), frac) if len(series) >= 2 else (slice(0, 1), slice(0, 1))
    steps = series.steps_S
    fig, axes = panel_grid(len(keys), lambda rows, cols: (4.2 * cols, 3.0 * rows))
    for ax, key in zip(axes, keys, strict=True):
        labels, m_SL = series.matrix(key, by)
        x = np.arange(len(labels))
        for rows_, label, color in ((a, "early", "C0"), (b, "late", "C3")):
            y = _nanmean_rows(m_SL[rows_])
            ax.plot(x, y, marker="o", color=color, label=f"{label}: steps {span(steps[rows_])}")
        if key in _ZERO_LINE:
            ax.axhline(0.0, color="0.4", linewidth=0.8, linestyle="--")
        _style_parts_axis(ax, key, labels, by)
    plots.append(save(fig, out_dir, f"{by.name}_profile", by.name, *profile))

    keys = [k for k in HEATMAP_KEYS if len(by.labels(series.columns, k)) >= 2]
    if not keys:
        return plots
    fig, axes = figure(len(keys), 1, 7.5, 2.4 * len(keys))
    for ax, key in zip(axes.flat, keys, strict=False):
        labels, m_SL = series.matrix(key, by)
        cmap = "viridis_r" if key in _LOWER_IS_BETTER else "viridis"  # bright = better
        image = ax.imshow(
            np.ma.masked_invalid(m_SL.T),
            aspect="auto",
            origin="lower",
            interpolation="nearest",
            cmap=cmap,
            extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(labels) - 0.5),
        )
        fig.colorbar(image, ax=ax, shrink=0.9)
        ax.set_yticks(range(len(labels)), [by.tick(label) for label in labels], fontsize=7)
        if len(labels) > 10:
            ax.yaxis.set_major_locator(_max_n_locator(10))
        ax.set_ylabel(by.name, fontsize=9)
        ax.set_title(_LABELS.get(key, key), fontsize=10)
        ax.tick_params(labelsize=8)
    axes.flat[-1].set_xlabel("step", fontsize=9)
    plots.append(save(fig, out_dir, f"{by.name}_heatmap", by.name, *heatmap))
    return plots


def _nanmean_rows(m_RB: np.ndarray) -> np.ndarray:
    """Mean over rows ignoring nan; nan for an all-nan column (no RuntimeWarning)."""
    import numpy as np

    ok = np.isfinite(m_RB)
    counts_B = ok.sum(axis=0)
    sums_B = np.where(ok, m_RB, 0.0).sum(axis=0)
    return np.where(counts_B > 0, sums_B / np.maximum(counts_B, 1), np.nan)


def _max_n_locator(n: int) -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(n, integer=True)


# --------------------------------------------------------------------------------------------
# probe.json
# --------------------------------------------------------------------------------------------

PROBE_BAR_KEYS = (
    "overlap/ratio",
    "overlap/token_advantage",
    "entropy/gap",
    "kl/sampled",
    "overlap/mass_teacher",
    "reward/seq_mean",
)
PROBE_DEPTH_KEYS = ("overlap/ratio", "overlap/token_advantage", "entropy/gap", "kl/sampled")


# `opd probe`'s verdict classes, where present; otherwise compatible / signal decide.
_CLASS_COLORS = {"good": GREEN, "borderline": ORANGE, "no-signal": ORANGE, "incompatible": RED}


def verdict_color(verdict: dict[str, Any]) -> str:
    """Green: compatible with a real signal. Orange: compatible (or borderline) but no signal:
    OPD would not hurt, nor teach much. Red: incompatible, where the paper sees OPD fail. Grey:
    no verdict (a teacher the probe could not reach)."""
    if not verdict:
        return GREY
    if verdict.get("class") in _CLASS_COLORS:
        return _CLASS_COLORS[verdict["class"]]
    if not verdict.get("compatible"):
        return RED
    return GREEN if verdict.get("signal") else ORANGE


def teachers_by_rank(probe: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(probe["teachers"], key=lambda t: (t.get("rank") is None, t.get("rank") or 0))


def _metrics(teacher: dict[str, Any]) -> dict[str, Any]:
    """A teacher's metrics; {} for one the probe could not reach (it has "error" instead)."""
    return teacher.get("metrics") or {}


def probe_plots(probe: dict[str, Any], out_dir: Path) -> list[Plot]:
    teachers = teachers_by_rank(probe)
    names = [str(t.get("name", "?")) for t in teachers]
    colors = [verdict_color(t.get("verdict") or {}) for t in teachers]
    plots = []
    keys = [k for k in PROBE_BAR_KEYS if any(k in _metrics(t) for t in teachers)]
    if keys:
        longest = max(map(len, names))  # rotated tick labels need room below the bars
        fig, axes = panel_grid(
            len(keys), lambda rows, cols: (4.2 * cols, 2.6 * rows + 0.05 * longest)
        )
        for ax, key in zip(axes, keys, strict=True):
            values = [num(_metrics(t).get(key)) for t in teachers]
            ax.bar(range(len(names)), values, color=colors)
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
            ax.axhline(0.0, color="0.4", linewidth=0.8)
            ax.set_title(_LABELS.get(key, key), fontsize=10)
            ax.tick_params(axis="y", labelsize=8)
            ax.grid(axis="y", alpha=0.3)
        plots.append(
            save(
                fig,
                out_dir,
                "probe_metrics",
                "probe",
                "Teachers compared on the student's rollouts",
                "One bar per teacher, in rank order; green: compatible with a real signal, orange: "
                "borderline or no signal, red: incompatible. A good teacher has high overlap and "
                "overlap mass (compatible thinking patterns) and a clear KL / negative reward (it "
                "knows something the student does not).",
            )
        )
    plots += _teachers_by(
        teachers,
        names,
        out_dir,
        DEPTH,
        "Teachers by depth",
        "The main diagnostics per bucket of completion positions, one line per teacher. "
        "A teacher whose overlap falls or whose KL grows toward the end of the responses "
        "gives a weaker signal on long responses.",
    )
    plots += _teachers_by(
        teachers,
        names,
        out_dir,
        TURN,
        "Teachers by turn",
        "Episodes (--env): the main diagnostics on the positions of each assistant turn of the "
        "student's episodes (0: the first reply), one line per teacher. A teacher whose "
        "overlap falls or whose KL grows on later turns, after tool results and follow-ups, "
        "gives a weaker signal deep in an episode.",
    )
    return plots


def _teachers_by(
    teachers: list[dict[str, Any]],
    names: list[str],
    out_dir: Path,
    by: Breakdown,
    title: str,
    caption: str,
) -> list[Plot]:
    """PROBE_DEPTH_KEYS per part of `by`, one line per teacher ("probe_{by.name}"); nothing
    when no teacher has a key in 2 or more parts."""
    keys = [
        k for k in PROBE_DEPTH_KEYS if any(len(by.labels(_metrics(t), k)) >= 2 for t in teachers)
    ]
    if not keys:
        return []
    fig, axes = panel_grid(len(keys), lambda rows, cols: (4.8 * cols, 3.0 * rows), 2)
    for ax, key in zip(axes, keys, strict=True):
        labels = sorted({label for t in teachers for label in by.labels(_metrics(t), key)})
        for i, (t, name) in enumerate(zip(teachers, names, strict=True)):
            m = _metrics(t)
            y = [num(m.get(by.column(key, label))) for label in labels]
            ax.plot(range(len(labels)), y, marker="o", color=f"C{i}", label=name)
        _style_parts_axis(ax, key, labels, by)
    return [save(fig, out_dir, f"probe_{by.name}", "probe", title, caption)]


# --------------------------------------------------------------------------------------------
# coldstart.json + sft_metrics.jsonl
# --------------------------------------------------------------------------------------------

COUNT_KEYS = ("prompts", "responses", "kept", "truncated", "repetition", "no_answer", "empty")


def coldstart_plots(
    coldstart: dict[str, Any] | None, sft: Series | None, out_dir: Path
) -> list[Plot]:
    plots = []
    loss = sft.get("sft/loss") if sft is not None else None
    if sft is not None and loss is not None:
        fig, axes = figure(1, 1, 7.5, 3.0)
        ax = axes[0, 0]
        ax.plot(sft.steps_S, loss, marker="o" if len(sft) <= SMOOTH_ABOVE else None, color="C0")
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.set_ylabel("SFT loss (nats/token)", fontsize=9, color="C0")
        ax.grid(alpha=0.3)
        lr = sft.get("sft/lr")
        if lr is not None:
            ax2 = ax.twinx()
            ax2.plot(sft.steps_S, lr, color="C1", linestyle="--", linewidth=1)
            ax2.set_ylabel("learning rate", fontsize=9, color="C1")
            ax2.tick_params(labelsize=8)
        ax.tick_params(labelsize=8)
        ax.set_title("cold-start SFT on teacher responses", fontsize=10)
        plots.append(
            save(
                fig,
                out_dir,
                "sft_loss",
                "coldstart",
                "Cold-start SFT loss",
                "Token-mean cross-entropy of the student on the teacher's kept responses, per "
                "optimizer step (dashed: learning rate). It should fall and flatten; a loss that "
                "keeps falling fast suggests more epochs, one that rises suggests a too-high lr.",
            )
        )
    counts = (coldstart or {}).get("counts") or {}
    keys = [k for k in COUNT_KEYS if k in counts] + sorted(set(counts) - set(COUNT_KEYS))
    if keys:
        fig, axes = figure(1, 1, 7.5, 0.5 + 0.35 * len(keys))
        ax = axes[0, 0]
        values = [num(counts[k]) for k in keys]
        total = ("prompts", "responses")
        colors = ["#34495e" if k in total else GREEN if k == "kept" else RED for k in keys]
        ax.barh(range(len(keys)), values, color=colors)
        ax.set_yticks(range(len(keys)), keys, fontsize=8)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            if math.isfinite(v):
                ax.text(v, i, f" {v:g}", va="center", fontsize=8)
        ax.set_xlabel("responses", fontsize=9)
        ax.tick_params(labelsize=8)
        plots.append(
            save(
                fig,
                out_dir,
                "coldstart_counts",
                "coldstart",
                "Cold-start filter",
                "Teacher responses generated, kept for SFT (green) and dropped by each filter "
                "(red): truncated, repetitive, without a final answer, empty. Many drops mean "
                "the teacher's generation settings or max length need a look.",
            )
        )
    return plots
