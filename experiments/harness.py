"""What the research harnesses (experiments.replication, experiments.multiturn) share: reading a
run's metrics and writing the study's results (tables and results.json) with its timing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any


def run_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """An `opd train` run's metrics.jsonl lines."""
    from opd.client.train.metric_log import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def write_results(
    results: dict[str, Any],
    timing: dict[str, float],
    plan: Any,
    started: float,
    write_tables: Callable[[dict[str, Any], Path], Any],
    tables_path: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Finish a study: the total time, the plan and the tables' verdicts into `results`, the
    tables to `tables_path`, every number to results.json beside it (nan as null)."""
    from opd.client.train.metric_log import finite_json

    timing["total_s"] = round(time.perf_counter() - started, 1)
    results["timing"] = timing
    results["plan"] = asdict(plan)
    results["verdicts"] = write_tables(results, tables_path)
    (tables_path.parent / "results.json").write_text(json.dumps(finite_json(results), indent=1))
    log(f"wrote {tables_path} in {timing['total_s']:.0f} s")
    return results
