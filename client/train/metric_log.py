"""One log call per step, behind a tiny interface: JSONL (always), TensorBoard, or nowhere.

Keys are namespaced (`train/loss`, `overlap/ratio`, `time/score_s`). metrics.jsonl holds one
JSON object per step with a "step" key; it is what `--resume` equality is checked on and what
reports read. The experiment trackers (Weights & Biases, MLflow, Trackio) and the function that
picks the loggers of a run live in loggers.py; this module stays import-light (no torch until a
TensorBoardLogger is built) because the evaluation and report code import its helpers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol


class MetricLogger(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a step as floats, NaN dropped.

    A NaN (a diagnostic with no positions this step, an outcome not measured) means "no value",
    not a point to plot: the trackers would draw it as a gap or reject it, so every backend but
    the JSONL (which keeps the key as null, for resume equality) leaves it out. Infinities stay:
    a diverged loss should show."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    }


class JsonlLogger:
    def __init__(self, path: Path, truncate_after_step: int | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and path.exists():
            # Resuming: drop lines from steps after the checkpoint, they will be redone.
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= truncate_after_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        self._fh = open(path, "a")  # noqa: SIM115

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()
        }
        self._fh.write(json.dumps({"step": step, **clean}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class TensorBoardLogger:
    """Scalars to TensorBoard event files under `log_dir`.

    `purge_step`: on resume, the first step that will be redone (checkpoint step + 1), so the
    events the interrupted attempt wrote from there on are hidden and each step shows once.
    `config`: shown once as text (TEXT tab), so the run's settings travel with its curves."""

    def __init__(
        self,
        log_dir: Path,
        *,
        purge_step: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ModuleNotFoundError(
                "the tensorboard logger needs torch and tensorboard: pip install tensorboard"
            ) from e

        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        if config is not None:
            text = "```json\n" + json.dumps(finite_json(config), indent=2, default=str) + "\n```"
            self._writer.add_text("config", text, global_step=purge_step or 0)
            self._writer.flush()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in scalars(metrics).items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MultiLogger:
    """Several loggers as one. close() closes every one even if an earlier one fails (then
    raises the first error), so a tracker's error never leaves metrics.jsonl unflushed."""

    def __init__(self, *loggers: MetricLogger) -> None:
        self.loggers = loggers

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def close(self) -> None:
        first: BaseException | None = None
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as e:  # close the others, then report
                first = first or e
        if first is not None:
            raise first


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finite_json(obj: Any) -> Any:
    """NaN and infinities -> None, recursively, so summaries (probe.json, eval.json,
    eval.jsonl) are strict JSON, as the metrics log writes them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj
