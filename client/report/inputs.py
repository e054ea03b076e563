"""The inputs of `opd report`: what a run or probe folder holds, read into `RunInputs`.

`load_inputs(RUN_DIR)` reads whatever of INPUT_FILES (and config.json, and the list of saved
rollout steps) the folder holds; the JSONL logs become `Series` (columns over steps, nan where
a step did not log a key). ReportError when there is nothing to report or a file cannot be read.
A metric broken down by depth (`key@depth{a}-{b}`) or by assistant turn (`key@turn{j}`) is read
through one `Breakdown` each, DEPTH and TURN.
build.py lists what each file is; health.py, plots.py and html.py read what this module loads.
Importing it is cheap: numpy is imported inside the functions.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DEPTH",
    "INPUT_FILES",
    "TURN",
    "Breakdown",
    "ReportError",
    "RunInputs",
    "Series",
    "depth_buckets",
    "load_inputs",
    "num",
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


@dataclass(frozen=True)
class Breakdown:
    """How a metric is split into parts, each logged as its own key `<key>@<name><label>`: by
    depth bucket (`@depth{a}-{b}`, label (a, b)) or by assistant turn (`@turn{j}`, label (j,)).
    Labels are tuples of ints, ordered as the parts are (shallow first, first turn first)."""

    name: str  # "depth" | "turn": the word in the key, and the report section of its figures
    axis: str  # what the parts are, for an axis label
    suffix: re.Pattern[str]  # the label after "@<name>"

    def labels(self, metrics: Iterable[str], key: str) -> list[tuple[int, ...]]:
        """The label of every `key@<name><label>` among the names in `metrics`, in order."""
        found = set()
        marker = f"{key}@{self.name}"
        for name in metrics:
            if name.startswith(marker):
                m = self.suffix.fullmatch(name, len(marker))
                if m:
                    found.add(tuple(int(g) for g in m.groups()))
        return sorted(found)

    def column(self, key: str, label: tuple[int, ...]) -> str:
        """The logged key of `key`'s part `label`."""
        return f"{key}@{self.name}{self.tick(label)}"

    @staticmethod
    def tick(label: tuple[int, ...]) -> str:
        """The label as text: "0-1023" for a depth bucket, "2" for a turn."""
        return "-".join(map(str, label))


DEPTH = Breakdown("depth", "completion position (depth bucket)", re.compile(r"(\d+)-(\d+)"))
TURN = Breakdown("turn", "assistant turn", re.compile(r"(\d+)"))


class ReportError(ValueError):
    """The run folder has nothing to report on, or an input cannot be read."""


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
        return self.matrix(key, DEPTH)

    def matrix(self, key: str, by: Breakdown) -> tuple[list[tuple[int, ...]], np.ndarray]:
        """The parts of `key` under `by` and its [S, L] values (nan where a step had no
        position in that part: no such depth, or no episode that long)."""
        import numpy as np

        labels = by.labels(self.columns, key)
        cols = [self.columns[by.column(key, label)] for label in labels]
        return labels, (np.stack(cols, axis=1) if cols else np.empty((len(self), 0)))


def depth_buckets(metrics: Iterable[str], key: str) -> list[tuple[int, int]]:
    """(a, b) of every `key@depth{a}-{b}` among the names in `metrics`, by depth."""
    return DEPTH.labels(metrics, key)


def _as_float(v: Any) -> float | None:
    """A logged value as a float; None for anything but a number (a bool is not one)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def num(v: Any) -> float:
    """A value read from a run's files as a float, nan for anything but a number."""
    f = _as_float(v)
    return math.nan if f is None else f


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
