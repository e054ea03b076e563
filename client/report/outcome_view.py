"""The report's outcome parts: accuracy over training, `opd eval` summaries, and the probe's
reward AUROC and teacher-continuation depth curve, along a response (by prefix length) and
across an episode's turns (by start turn): DEPTH_FORMS.

Inputs (any subset): RUN_DIR/eval.jsonl (`opd train --eval-set`: one line per evaluation, step 0
is before training), RUN_DIR/eval.json (`opd eval`), and the "student_outcome", per-teacher
"outcome" and "depth_probe" entries of probe.json. Plots go in section "outcome" (training and
eval) or "probe" (the depth curve); html.py places the sections.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opd.client.report.figures import GREEN, GREY, RED, Plot, figure, save
from opd.client.report.html_parts import embed_figures, fmt, table
from opd.client.report.inputs import num

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from opd.client.report.inputs import RunInputs, Series


# The y range of an accuracy panel: [0, 1] with a margin, so points at 0 and 1 stay visible.
_ACCURACY = (-0.02, 1.02)


def outcome_plots(inputs: RunInputs, out_dir: Path) -> list[Plot]:
    plots = []
    if inputs.evals is not None:
        plots += training_accuracy_plot(inputs.evals, out_dir)
    if inputs.eval_summary is not None:
        plots += eval_summary_plot(inputs.eval_summary, out_dir)
    if inputs.probe is not None and inputs.probe.get("depth_probe"):
        plots += depth_probe_plot(inputs.probe["depth_probe"], out_dir)
    return plots


def training_accuracy_plot(evals: Series, out_dir: Path) -> list[Plot]:
    import numpy as np

    acc = evals.get("accuracy")
    if acc is None:
        return []
    steps = evals.steps_S
    recovery = evals.get("gap_recovery")
    fig, axes = figure(1, 2 if recovery is not None else 1, 9.6 if recovery is not None else 5, 3.2)
    ax = axes[0, 0]
    lo, hi = evals.get("accuracy_lo"), evals.get("accuracy_hi")
    if lo is not None and hi is not None:
        ax.fill_between(steps, lo, hi, color="C0", alpha=0.2, linewidth=0, label="95% CI")
    ax.plot(steps, acc, marker="o", color="C0", label="student")
    teacher = evals.get("teacher_accuracy")
    if teacher is not None:
        value = float(teacher[np.isfinite(teacher)][0])
        ax.axhline(value, color=GREEN, linestyle="--", label=f"teacher {value:.3f}")
    ax.axhline(float(acc[0]), color=GREY, linestyle=":", label=f"before {acc[0]:.3f}")
    _style(ax, "step", "accuracy (mean@n)", _ACCURACY)
    if recovery is not None:
        ax2 = axes[0, 1]
        ax2.plot(steps, recovery, marker="o", color="C1")
        ax2.axhline(0.0, color="0.4", linewidth=0.8)
        ax2.axhline(0.8, color=GREEN, linestyle="--", linewidth=0.8, label="0.8 (a good pair)")
        _style(ax2, "step", "gap recovery rate")
    return [
        save(
            fig,
            out_dir,
            "eval_accuracy",
            "outcome",
            "Accuracy over training",
            "The student's accuracy on the held-out questions (Wilson 95% band) before training "
            "(step 0) and at every evaluation, against the teacher's (dashed). Right: the gap "
            "recovery rate (acc - acc_before) / (acc_teacher - acc_before); the method calls a "
            "pair good above 0.8.",
        )
    ]


def eval_summary_plot(summary: dict[str, Any], out_dir: Path) -> list[Plot]:
    sources = summary.get("sources") or []
    if not sources:
        return []
    names = [f"{s['kind']}\n{s['label']}" for s in sources]
    acc = [num(s["summary"].get("mean_at_n")) for s in sources]
    err = _error_bars(acc, [s["summary"].get("mean_at_n_interval") for s in sources])
    colors = [GREEN if s["kind"] == "teacher" else "C0" for s in sources]
    fig, axes = figure(1, 1, max(4.0, 1.3 * len(sources) + 1.5), 3.2)
    ax = axes[0, 0]
    ax.bar(range(len(names)), acc, yerr=err, color=colors, capsize=4)
    ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set_ylabel(f"mean@{summary.get('config', {}).get('n', 'n')}")
    ax.set_ylim(0, 1.02)
    ax.grid(axis="y", alpha=0.3)
    return [
        save(
            fig,
            out_dir,
            "eval_sources",
            "outcome",
            "opd eval: accuracy per source",
            "mean@n of every evaluated student (blue) and teacher (green) on the same questions "
            "and seeds, with 95% intervals.",
        )
    ]


@dataclass(frozen=True)
class DepthForm:
    """One form of probe.json's "depth_probe": its rows and how they read. `opd probe --depth`
    cuts single responses at prefix lengths ("by_prefix", accuracy of the continuation);
    `opd probe --depth --env` replays episodes through their first j assistant turns ("by_turn",
    the continued episode's score: the environment's reward, or correctness). Each row:
    {x, "rollouts", "student": {score, ...}, "teachers": {name: {score, "advantage",
    "advantage_ci"}}}."""

    rows: str  # the key of the rows in depth_probe
    x: str  # a row's position field
    score: str  # the student's and a teacher's score field
    x_label: str  # the plot's x axis
    y_label: str  # the plot's left y axis
    advantage_label: str  # the plot's right y axis
    headers: tuple[str, ...]  # the table's: x, teacher, rollouts, student, teacher, advantage
    intro: str  # the table's, with {samples}
    name: str  # the PNG
    title: str
    caption: str
    y_range: tuple[float, float] | None = None
    ticks_at_x: bool = False  # one tick per row (discrete starts)
    score_ci: bool = False  # the table shows the scores' intervals too


DEPTH_FORMS = (
    DepthForm(
        rows="by_prefix",
        x="prefix_tokens",
        score="accuracy",
        x_label="prefix length (completion tokens)",
        y_label="accuracy of the continuation",
        advantage_label="teacher advantage (acc_teacher - acc_student)",
        headers=("prefix tokens", "teacher", "rollouts", "student acc", "teacher acc", "advantage"),
        intro="Depth probe: {samples} continuations per prefix and model.",
        name="probe_depth_continuation",
        title="Teacher-continuation depth probe",
        caption="Left: accuracy when the teacher (colours) or the student (grey) continues the "
        "same student prefixes, by prefix length. Right: the teacher's advantage with a "
        "bootstrap 95% interval over rollouts. The method's long-horizon finding: the advantage "
        "falls as the prefix grows (the teacher's dense reward matters less deep in a "
        "response).",
        y_range=_ACCURACY,
    ),
    DepthForm(
        rows="by_turn",
        x="turn",
        score="score",
        x_label="start turn (assistant turns the student played first)",
        y_label="score of the continued episode",
        advantage_label="teacher advantage (teacher - student)",
        headers=("from turn", "teacher", "episodes", "student score", "teacher score", "advantage"),
        intro="Depth probe across turns: {samples} continuations per start and model; the "
        "score is the environment's reward, or the correctness of the final answer.",
        name="probe_depth_turns",
        title="Teacher-continuation depth probe across turns",
        caption="Left: the score of the episode when the teacher (colours) or the student "
        "(grey) plays on from assistant turn j of the same student episodes (the first j "
        "turns are the student's own; 0: from the start). Right: the teacher's advantage with "
        "a bootstrap 95% interval over episodes. An advantage that falls toward 0 as j grows "
        "means the teacher helps less once the student has steered the episode: its signal "
        "matters most on the early turns.",
        ticks_at_x=True,
        score_ci=True,
    ),
)


def depth_probe_plot(depth: dict[str, Any], out_dir: Path) -> list[Plot]:
    """The depth curve of every form in `depth` (DEPTH_FORMS), in section "probe"."""
    return [plot for form in DEPTH_FORMS for plot in _depth_form_plot(depth, form, out_dir)]


def _depth_form_plot(depth: dict[str, Any], form: DepthForm, out_dir: Path) -> list[Plot]:
    rows = depth.get(form.rows) or []
    if not rows:
        return []
    x = [r[form.x] for r in rows]
    teachers = sorted({name for r in rows for name in r["teachers"]})
    fig, axes = figure(1, 2, 9.6, 3.2)
    ax, ax2 = axes[0, 0], axes[0, 1]
    ax.plot(
        x,
        [num(r["student"][form.score]) for r in rows],
        marker="o",
        color=GREY,
        label="student continues",
    )
    for i, name in enumerate(teachers):
        ys = [num(r["teachers"].get(name, {}).get(form.score)) for r in rows]
        ax.plot(x, ys, marker="o", color=f"C{i}", label=f"{name} continues")
        adv = [num(r["teachers"].get(name, {}).get("advantage")) for r in rows]
        err = _error_bars(adv, [r["teachers"].get(name, {}).get("advantage_ci") for r in rows])
        ax2.errorbar(x, adv, yerr=err, marker="o", color=f"C{i}", capsize=3, label=name)
    _style(ax, form.x_label, form.y_label, form.y_range)
    ax2.axhline(0.0, color=RED, linewidth=0.8)
    _style(ax2, form.x_label, form.advantage_label)
    if form.ticks_at_x:
        for a in (ax, ax2):
            a.set_xticks(x)
    return [save(fig, out_dir, form.name, "probe", form.title, form.caption)]


# ---- HTML -------------------------------------------------------------------------------------


def outcome_section(inputs: RunInputs, plots: list[Plot]) -> str:
    """The "Outcome" section: accuracy over training and `opd eval` results."""
    parts = []
    if inputs.evals is not None:
        ev = inputs.evals
        rows = []
        for i, step in enumerate(ev.steps_S):
            col = {k: ev.columns[k][i] for k in ev.columns}
            rows.append(
                (
                    str(int(step)) + (" (before)" if step == 0 else ""),
                    fmt(col.get("accuracy")),
                    f"[{fmt(col.get('accuracy_lo'))}, {fmt(col.get('accuracy_hi'))}]",
                    fmt(col.get("pass_at_n")),
                    fmt(col.get("extraction_failure_rate")),
                    fmt(col.get("teacher_accuracy")),
                    fmt(col.get("gap_recovery")),
                )
            )
        headers = ("step", "accuracy", "95% CI", "pass@n", "no answer", "teacher", "gap recovery")
        parts.append(
            "<p>The student's accuracy on held-out questions over training "
            "(<code>eval.jsonl</code>).</p>" + table(headers, rows, {1, 3, 4, 5, 6})
        )
    if inputs.eval_summary is not None:
        s = inputs.eval_summary
        rows = []
        for src in s.get("sources", []):
            m = src["summary"]
            lo, hi = (m.get("mean_at_n_interval") or [None, None])[:2]
            plo, phi = (m.get("pass_at_k_interval") or [None, None])[:2]
            rows.append(
                (
                    html.escape(f"{src['kind']} {src['label']}"),
                    fmt(m.get("mean_at_n")),
                    f"[{fmt(lo)}, {fmt(hi)}]",
                    fmt(m.get("pass_at_k")),
                    f"[{fmt(plo)}, {fmt(phi)}]",
                    fmt(m.get("extraction_failures")),
                )
            )
        recovery = "".join(
            f"<li>gap recovery {html.escape(g['before'])} &rarr; {html.escape(g['after'])} "
            f"(teacher {html.escape(g['teacher'])}): <b>{fmt(g['gap_recovery'])}</b></li>"
            for g in s.get("gap_recovery", [])
        )
        headers = ("source", "mean@n", "95% CI", "pass@k", "95% CI", "no answer")
        parts.append(
            f"<p><code>opd eval</code> on <code>{html.escape(str(s.get('data')))}</code>, "
            f"{fmt(s.get('items'))} questions.</p>"
            + table(headers, rows, {1, 3, 5})
            + (f"<ul>{recovery}</ul>" if recovery else "")
        )
    return "".join(parts) + embed_figures(plots, "outcome")


def probe_outcome_html(probe: dict[str, Any]) -> str:
    """The probe's outcome numbers: the student's accuracy on its own rollouts, each teacher's
    reward AUROC, and the depth-probe table."""
    parts = []
    student = probe.get("student_outcome")
    if student:
        lo, hi = (student.get("mean_at_n_interval") or [None, None])[:2]
        parts.append(
            f"<p>Student accuracy on its probe rollouts: <b>{fmt(student.get('mean_at_n'))}</b> "
            f"[{fmt(lo)}, {fmt(hi)}] over {fmt(student.get('prompts'))} prompts.</p>"
        )
    rows = [
        (
            html.escape(str(t.get("name", "?"))),
            fmt(t["outcome"].get("auroc"))
            + " [{}, {}]".format(*map(fmt, t["outcome"].get("auroc_interval") or [None, None])),
            fmt(t["outcome"].get("reward_mean_correct")),
            fmt(t["outcome"].get("reward_mean_wrong")),
            f"{t['outcome'].get('correct')}/{t['outcome'].get('rollouts')}",
        )
        for t in probe.get("teachers", [])
        if t.get("outcome")
    ]
    if rows:
        parts.append(
            "<p>Reward AUROC: how well each teacher's sequence mean reward r(y) ranks the "
            "student's right answers above its wrong ones (0.5 = no information; the paper "
            "reports 0.73 and 0.75).</p>"
            + table(("teacher", "AUROC", "r right", "r wrong", "right/rollouts"), rows, {1, 2, 3})
        )
    depth = probe.get("depth_probe")
    if depth:
        parts += [_depth_form_table(depth, form) for form in DEPTH_FORMS if depth.get(form.rows)]
    return "".join(parts)


def _depth_form_table(depth: dict[str, Any], form: DepthForm) -> str:
    """One row per position and teacher: rollouts, both scores, the advantage [95% CI]."""
    rows = []
    for r in depth[form.rows]:
        student = r["student"]
        for name, t in r["teachers"].items():
            lo, hi = (t.get("advantage_ci") or [None, None])[:2]
            rows.append(
                (
                    str(r[form.x]),
                    html.escape(name),
                    str(r["rollouts"]),
                    _score(student, form),
                    _score(t, form),
                    f"{fmt(t.get('advantage'))} [{fmt(lo)}, {fmt(hi)}]",
                )
            )
    intro = html.escape(form.intro.format(samples=depth.get("samples")))
    return f"<p>{intro}</p>" + table(form.headers, rows, {2, 3, 4})


def _score(entry: dict[str, Any], form: DepthForm) -> str:
    """A student's or teacher's score, with its interval where the form shows one."""
    text = fmt(entry.get(form.score))
    if form.score_ci and entry.get("ci"):
        lo, hi = (entry["ci"] + [None, None])[:2]
        text += f" [{fmt(lo)}, {fmt(hi)}]"
    return text


def _style(ax: Axes, xlabel: str, ylabel: str, ylim: tuple[float, float] | None = None) -> None:
    """Labels, the y range where one is given, the light grid and the legend of a panel."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _error_bars(values: list[float], intervals: list[Any]) -> list[list[float]]:
    """matplotlib's yerr (below, above) from (lo, hi) intervals; a missing interval draws none."""
    spans = [iv if iv and len(iv) == 2 else [math.nan, math.nan] for iv in intervals]
    return [
        [max(0.0, v - num(iv[0])) for v, iv in zip(values, spans, strict=True)],
        [max(0.0, num(iv[1]) - v) for v, iv in zip(values, spans, strict=True)],
    ]
