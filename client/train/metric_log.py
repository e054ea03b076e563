"""One log call per step, to JSONL and TensorBoard (or nowhere), behind a tiny interface.

Keys are namespaced (`train/loss`, `overlap/ratio`, `time/score_s`). metrics.jsonl holds one
JSON object per step with a "step" key; it is what `--resume` equality is checked on and what
reports read.
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
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, int | float) and not math.isnan(value):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MultiLogger:
    def __init__(self, *loggers: MetricLogger) -> None:
        self.loggers = loggers

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


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
