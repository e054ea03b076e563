"""Prompt sets for training: JSONL, Parquet or a local HF datasets folder, plus the shipped set.

`PromptOrder` decides which prompt comes next: a seeded permutation per epoch, so that the
position (epoch, index) is all a checkpoint needs to continue the exact same order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

SHIPPED = "shipped"


def shipped_prompts_path() -> Path:
    """The small prompt set inside the package, used by `opd quickstart`."""
    return Path(str(resources.files("opd.client") / "data" / "prompts.jsonl"))


def load_prompts(source: str, field: str = "prompt") -> list[str]:
    """Prompts from `source`: "shipped", a .jsonl/.json file, a .parquet file, a folder saved
    with datasets' save_to_disk, or a generated task ("task:NAME[:SPLIT]"). `field` names the
    column holding the prompt text."""
    rows, where = load_rows(source)
    return column_texts(rows, field, where)


def load_rows(source: str) -> tuple[list[dict], str]:
    """The rows of a data set (JSONL/JSON, Parquet, a datasets folder, or "shipped") and a name
    for error messages. Shared by prompt sets and evaluation sets (opd.client.evaluation.data),
    so both accept the same sources."""
    from opd.client.evaluation.tasks import is_task, task_rows

    if is_task(source):  # a generated task (opd.client.evaluation.tasks)
        return task_rows(source), source
    path = shipped_prompts_path() if source == SHIPPED else Path(source)
    if path.is_dir():
        return _from_hf_folder(path), str(path)
    if not path.is_file():
        raise FileNotFoundError(f"data source {source!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path), str(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist(), str(path)
    raise ValueError(f"unsupported data file {path.name}: use .jsonl, .parquet or a folder")


def _read_jsonl(path: Path) -> list[dict]:
    text = path.read_text()
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON: {exc}") from None
    return rows


def _from_hf_folder(path: Path) -> list[dict]:
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict: take "train" if present, else the first split
        ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
    return ds.to_list()


def column_texts(rows: list[dict], field: str, where: str) -> list[str]:
    """The non-empty strings of column `field`, or a ValueError naming the first bad row."""
    out = []
    for i, row in enumerate(rows):
        value = row.get(field) if isinstance(row, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: row {i} has no non-empty string field {field!r}")
        out.append(value)
    if not out:
        raise ValueError(f"{where}: no prompts")
    return out


@dataclass
class PromptOrder:
    """Seeded, epoch-wise shuffled order over n prompts; `position` is (epoch, index)."""

    n: int
    seed: int
    shuffle: bool = True
    epoch: int = 0
    index: int = 0

    def _perm(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take(self, count: int) -> list[int]:
        """The next `count` prompt indices, rolling into the next epoch when one ends."""
        out: list[int] = []
        while len(out) < count:
            perm = self._perm(self.epoch)
            take = min(count - len(out), self.n - self.index)
            out.extend(int(i) for i in perm[self.index : self.index + take])
            self.index += take
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
