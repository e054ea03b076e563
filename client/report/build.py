"""`opd report RUN_DIR`: plots and one self-contained HTML page that say whether a run is healthy.

    opd report runs/exp1                      # writes runs/exp1/report/report.html + *.png
    opd report runs/exp1 --out-dir /tmp/r1    # elsewhere
    python -c "from pathlib import Path; from opd.client.report.build import build_report; \
               print(build_report(Path('runs/exp1')))"

Inputs, any subset of them in RUN_DIR:
    metrics.jsonl                      `opd train`: one JSON object per step (null = NaN)
    probe.json                         `opd probe`: several teachers on the same student rollouts
    coldstart.json, sft_metrics.jsonl  `opd coldstart`: filter counts, SFT loss per step
    quickstart.json                    `opd quickstart`: diagnostics before / after
    eval.jsonl                         `opd train --eval-set`: accuracy over training
    eval.json                          `opd eval`: accuracy per source, gap recovery
    config.json                        `opd train`'s config, shown in the page header
    rollouts/step_*.parquet            saved rollouts (opd.client.train.rollout_store), shown
                                       token by token; not an input on their own

Outputs in OUT_DIR (default RUN_DIR/report): one PNG per plot (matplotlib, Agg backend) and
report.html, which embeds them as base64 data URIs and needs nothing else to display.

The page's "health" section turns the paper's failure signature (overlap flat, overlap-token
advantage stuck negative, entropy gap not closing, small gradient norm from the start; see
docs/method.md) into checks: health.py, with its thresholds.

This module holds the command; inputs.py reads the inputs (RunInputs, Series, load_inputs),
health.py judges, plots.py draws (matplotlib, imported inside its functions), html.py writes
the page. Importing this module is cheap: no numpy or matplotlib until a report is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from opd.client.report import html as report_html
from opd.client.report import plots as report_plots
from opd.client.report.health import WINDOW_FRAC, Check, health_checks
from opd.client.report.inputs import ReportError, load_inputs

__all__ = ["build_report", "report_command"]


def build_report(
    run_dir: Path, out_dir: Path | None = None, *, window: float = WINDOW_FRAC
) -> Path:
    """Write the PNGs and report.html into out_dir (default run_dir/report); return the HTML."""
    return _write_report(Path(run_dir), out_dir, window)[0]


def _write_report(run_dir: Path, out_dir: Path | None, window: float) -> tuple[Path, list[Check]]:
    if not 0 < window <= 0.5:
        raise ValueError(f"window must be in (0, 0.5], got {window}")
    inputs = load_inputs(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    checks = health_checks(inputs.metrics, window) if inputs.metrics is not None else []
    plots = report_plots.all_plots(inputs, out, window)
    page = out / "report.html"
    page.write_text(report_html.render_page(inputs, checks, plots, window), encoding="utf-8")
    return page, checks


def report_command(
    run_dir: Annotated[
        str, typer.Argument(help="run folder: metrics.jsonl, probe.json, coldstart.json, ...")
    ],
    out_dir: Annotated[
        str | None, typer.Option(help="where to write report.html and the PNGs [RUN_DIR/report]")
    ] = None,
    window: Annotated[
        float, typer.Option(help="fraction of steps in the early and late windows (0-0.5]")
    ] = WINDOW_FRAC,
) -> None:
    """Plot a run's diagnostics and write one self-contained HTML page with health checks."""
    if not 0 < window <= 0.5:
        raise typer.BadParameter(f"must be in (0, 0.5], got {window}", param_hint="--window")
    try:
        page, checks = _write_report(Path(run_dir), Path(out_dir) if out_dir else None, window)
    except ReportError as e:
        raise typer.BadParameter(str(e), param_hint="RUN_DIR") from e
    if checks:
        counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warning", "n/a")}
        typer.echo("health: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        for c in checks:
            if c.status == "warning":
                typer.echo(f"  warning: {c.name}: {c.message}")
    typer.echo(f"report: {page}")
