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

This module reads the inputs and holds the command; health.py judges, plots.py
draws (matplotlib, imported inside its functions), html.py writes the page. Importing
this module is cheap: no numpy or matplotlib until a report is built.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from opd.client.report.health import WINDOW_FRAC, Check, health_checks
from opd.client.report.labels import MAIN_METRICS as _MAIN_METRICS

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "INPUT_FILES",
    "MAIN_METRICS",
    "Check",
    "ReportError",
    "RunInputs",
    "Series",
    "build_report",
    "health_checks",
    "load_inputs",
    "report_command",
]

# The files looked for in RUN_DIR, in the order the page shows them.
INPUT_FILES = (
    "metrics.jsonl",
    "probe.json",
    "coldstart.json",
    "sft_metrics.jsonl",
    "quickstart.json",
    "eval.jsonl",
    "eval.json",
)
# The diagnostics shown in tables and by-depth plots (the quickstart's list and labels).
MAIN_METRICS = _MAIN_METRICS

_DEPTH_KEY = re.compile(r"^(?P<key>.+)@depth(?P<a>\d+)-(?P<b>\d+)$")


class ReportError(ValueError):
    """The run folder has nothing to report on, or an input cannot be read."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass
class Series:
    """A JSONL log as columns: steps_S and, per key, a float64 [S] array (nan where a step did not
    log the key or logged null). S = number of distinct steps, ascending (a step logged twice
    keeps its last line, as after a resume)."""

    steps_S: np.ndarray
    columns: dict[str, np.ndarray]

    @classmethod
    def from_records(cls, records: list[dict[str, Any]]) -> Series:
        import numpy as np

        by_step = {int(r["step"]): r for r in records}
        steps = sorted(by_step)
        keys = sorted({k for r in by_step.values() for k in r} - {"step"})
        columns = {}
        for key in keys:
            col = [_as_float(by_step[s].get(key)) for s in steps]
            if any(v is not None for v in col):  # keep numeric keys only
                columns[key] = np.array([math.nan if v is None else v for v in col])
        return cls(np.array(steps, dtype=np.int64), columns)

    def __len__(self) -> int:
        return int(self.steps_S.size)

    def get(self, key: str) -> np.ndarray | None:
        """The column, or None when the key is absent or never finite."""
        import numpy as np

        col = self.columns.get(key)
        return col if col is not None and np.isfinite(col).any() else None

    def depth_buckets(self, key: str) -> list[tuple[int, int]]:
        """(a, b) of every `key@depth{a}-{b}` column, by depth."""
        return depth_buckets(self.columns, key)

    def depth_matrix(self, key: str) -> tuple[list[tuple[int, int]], np.ndarray]:
        """The buckets of `key` and its [S, B] values (nan where a step had no such position)."""
        import numpy as np

        buckets = self.depth_buckets(key)
        cols = [self.columns[f"{key}@depth{a}-{b}"] for a, b in buckets]
        return buckets, (np.stack(cols, axis=1) if cols else np.empty((len(self), 0)))


def depth_buckets(metrics: Iterable[str], key: str) -> list[tuple[int, int]]:
    """(a, b) of every `key@depth{a}-{b}` among the names in `metrics`, by depth."""
    found = set()
    for name in metrics:
        m = _DEPTH_KEY.match(name)
        if m and m["key"] == key:
            found.add((int(m["a"]), int(m["b"])))
    return sorted(found)


def _as_float(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


@dataclass
class RunInputs:
    run_dir: Path
    metrics: Series | None = None
    probe: dict[str, Any] | None = None
    coldstart: dict[str, Any] | None = None
    sft: Series | None = None
    quickstart: dict[str, Any] | None = None
    evals: Series | None = None  # eval.jsonl
    eval_summary: dict[str, Any] | None = None  # eval.json
    config: dict[str, Any] | None = None
    rollout_steps: list[int] = field(default_factory=list)  # saved under RUN_DIR/rollouts/

    @property
    def found(self) -> list[str]:
        return [name for name in INPUT_FILES if (self.run_dir / name).is_file()]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> Series:
    records = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ReportError(f"{path}:{i}: not JSON ({e})") from e
        if not isinstance(record, dict) or "step" not in record:
            raise ReportError(f"{path}:{i}: expected a JSON object with a 'step' key")
        records.append(record)
    if not records:
        raise ReportError(f"{path} holds no steps")
    return Series.from_records(records)


def _versioned(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    if data.get("version", 1) != 1:
        raise ReportError(f"{path}: version {data['version']}; this opd reads version 1")
    return data


def load_inputs(run_dir: Path) -> RunInputs:
    """Read whatever of INPUT_FILES (and config.json) RUN_DIR holds; ReportError if none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder")
    inputs = RunInputs(run_dir)
    if not inputs.found:
        raise ReportError(
            f"nothing to report in {run_dir}: looked for {', '.join(INPUT_FILES)} "
            "(written by opd train, probe, coldstart, quickstart and eval)"
        )
    p = run_dir.joinpath
    if p("metrics.jsonl").is_file():
        inputs.metrics = _read_jsonl(p("metrics.jsonl"))
    if p("probe.json").is_file():
        inputs.probe = _versioned(p("probe.json"))
        if not inputs.probe.get("teachers"):
            raise ReportError(f"{p('probe.json')} lists no teachers")
    if p("coldstart.json").is_file():
        inputs.coldstart = _versioned(p("coldstart.json"))
    if p("sft_metrics.jsonl").is_file():
        inputs.sft = _read_jsonl(p("sft_metrics.jsonl"))
    if p("quickstart.json").is_file():
        inputs.quickstart = _read_json(p("quickstart.json"))
    if p("eval.jsonl").is_file():
        inputs.evals = _read_jsonl(p("eval.jsonl"))
    if p("eval.json").is_file():
        inputs.eval_summary = _versioned(p("eval.json"))
    if p("config.json").is_file():
        inputs.config = _read_json(p("config.json"))
    from opd.client.train.rollout_store import saved_steps

    inputs.rollout_steps = saved_steps(run_dir)
    return inputs


# --------------------------------------------------------------------------------------------
# Report and command
# --------------------------------------------------------------------------------------------


def build_report(
    run_dir: Path, out_dir: Path | None = None, *, window: float = WINDOW_FRAC
) -> Path:
    """Write the PNGs and report.html into out_dir (default run_dir/report); return the HTML."""
    return _write_report(Path(run_dir), out_dir, window)[0]


def _write_report(run_dir: Path, out_dir: Path | None, window: float) -> tuple[Path, list[Check]]:
    from opd.client.report import html as report_html
    from opd.client.report import plots as report_plots

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
