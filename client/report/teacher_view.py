"""The report's "Teachers" section for a multi-teacher run: one panel set and one set of health
checks per teacher, and the teacher whose pair fails flagged.

Why: the method's conditions hold per student-teacher pair; the run's overall curves average
the pairs, so a teacher whose overlap stays flat can hide behind a healthy one. The trainer
logs every diagnostic per teacher under `teacher/<name>/` (opd.client.train.teacher_metrics);
here each teacher's keys become a Series of their own, checked by the same health checks as
the whole run, and drawn as the same kind of panels, one figure per teacher. A pair is
flagged as failing when a check of the paper's failure signature warns on it.
"""

from __future__ import annotations

import html
from pathlib import Path

from opd.client.report.figures import Panel, Plot, series_figure
from opd.client.report.health import Check, health_checks
from opd.client.report.inputs import Series

# The checks that are the paper's failure signature of a pair (health.py's names); the others
# (entropy blow-up, truncation) concern the student's sampling, not the pair.
PAIR_CHECKS = (
    "overlap ratio rises",
    "overlap-token advantage moves toward 0",
    "entropy gap closes",
    "overlap at the deepest positions does not fall",
)


def teacher_series(series: Series, name: str) -> Series:
    """The run's metrics as a single-teacher run of `name` would have logged them."""
    # imported here: opd.client.train.teacher_metrics imports torch (through rollouts), which
    # `import opd.client.report.*` must not
    from opd.client.train.teacher_metrics import PREFIX

    prefix = f"{PREFIX}{name}/"
    columns = {k[len(prefix) :]: v for k, v in series.columns.items() if k.startswith(prefix)}
    return Series(series.steps_S, columns)


def teacher_names(series: Series) -> list[str]:
    from opd.client.train.teacher_metrics import teachers_in  # imports torch: see teacher_series

    return teachers_in(list(series.columns))


def pair_fails(checks: list[Check]) -> list[Check]:
    """The failure-signature checks that warn for this pair."""
    return [c for c in checks if c.status == "warning" and c.name in PAIR_CHECKS]


def teacher_plots(series: Series, out_dir: Path, frac: float) -> list[Plot]:
    """Per teacher: overlap, KL, entropy gap and token share over steps (section "teachers")."""
    plots: list[Plot] = []
    for i, name in enumerate(teacher_names(series)):
        plots += series_figure(
            teacher_series(series, name),
            out_dir,
            frac,
            f"teacher_{i}",
            f"Teacher {name}",
            f"The diagnostics of {name}'s rollouts only, as a run with this teacher alone would "
            "show them, and its share of the step's completion tokens.",
            [
                Panel("top-k overlap ratio", [("overlap/ratio", "overlap")]),
                Panel("reverse KL (nats/token)", [("kl/sampled", "sampled token")]),
                Panel("entropy gap (nats)", [("entropy/gap", "H(p) - H(q)")], zero_line=True),
                Panel("share of tokens", [("token_share", "token share")]),
            ],
            section="teachers",
        )
    return plots


def teachers_section(series: Series, frac: float, figures: str) -> str:
    """A table (teacher, tokens, checks, verdict), each teacher's warnings, then the plots."""
    import numpy as np

    rows = []
    notes = []
    for name in teacher_names(series):
        mine = teacher_series(series, name)
        checks = health_checks(mine, frac)
        failing = pair_fails(checks)
        share = mine.get("token_share")
        share_text = f"{np.nanmean(share):.0%}" if share is not None else "-"
        warn = sum(c.status == "warning" for c in checks)
        verdict = (
            '<span class="badge warning">pair fails</span>'
            if failing
            else '<span class="badge ok">pair ok</span>'
        )
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td class='num'>{share_text}</td>"
            f"<td class='num'>{warn}</td><td>{verdict}</td></tr>"
        )
        for c in failing:
            notes.append(
                f"<li><b>{html.escape(name)}</b>: {html.escape(c.name)}: "
                f"{html.escape(c.message)} <code>{html.escape(c.numbers)}</code></li>"
            )
    table = (
        "<table><thead><tr><th>teacher</th><th>mean token share</th><th>warnings</th>"
        "<th>pair</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )
    intro = (
        "<p>Each teacher's rollouts, checked and drawn on their own: the method's conditions "
        "hold per pair, and the run's overall curves average the pairs. A pair fails when a "
        "check of the failure signature warns on it (flat overlap, advantage stuck negative, "
        "entropy gap not closing, deep positions falling behind).</p>"
    )
    flagged = f"<ul>{''.join(notes)}</ul>" if notes else ""
    return intro + table + flagged + figures
