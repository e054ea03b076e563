"""Saved rollouts: what a training step really sampled and scored, one Parquet file per step.

metrics.jsonl holds means. When one of them looks wrong (overlap collapses at step 300, the
reward jumps, the entropy climbs), the question is what the step actually used: which tokens
the student wrote and what the student and the teacher thought of each one. `RolloutWriter`
saves a step's rollouts as the trainer used them; `read_rollouts` brings them back as
`Rollout` objects, array for array and dtype for dtype, so a diagnostic can be recomputed on
exactly the same numbers; `opd report` shows a few of them token by token.

Why Parquet: pandas, polars, duckdb and pyarrow read it as it is, with typed, compressed
columns; no pickle, so opening a run folder someone shares cannot run code.

Layout: RUN_DIR/rollouts/step_{step:06d}.parquet, one row per rollout in the step's order.
A file appears whole or not at all (written under a hidden temporary name in the same folder,
then renamed); a step written again (a resumed run redoes its steps) replaces its file.

Columns (field names and shape suffixes: opd.client.train.positions):

    step, prompt_index, prompt_len   int64
    truncated                        bool
    token_ids                        list<int64>: prompt + completion
    completion_text                  string: the completion's pieces joined; null without
                                     token_text
    token_pieces                     list<string>: one decoded piece per completion token;
                                     null without token_text
    student_token_logp, ...          every per-position array of Rollout (its fields with a
                                     shape suffix: STUDENT_FIELDS, TEACHER_FIELDS, and any
                                     other, e.g. engine_token_logp) under its base name: a [T]
                                     array as list<dtype>, a [T,K] / [T,k] array as
                                     list<fixed_size_list<dtype, K>>

Episodes (opd.client.train.episodes) add, null for single completions (format version 2; a
step without episodes is still written as version 1):

    spans                            list<fixed_size_list<int64, 2>>: the trained [start, end)
                                     ranges of token_ids, one per assistant turn; the
                                     per-position arrays and token_pieces cover exactly their
                                     positions, in order
    context_roles                    list<string>: per assistant turn, the roles of the
                                     messages appended after it, comma-joined ("" after the last)
    context_texts                    list<string>: per assistant turn, the decoded ids appended
                                     after it (tool results, user turns); null without
                                     token_text
    ended                            string: done, max_turns, turn_tokens or episode_tokens
    reward                           float64: the environment's, null if it gave none
    turn_correct                     list<bool>: per-turn grades, where the environment keeps
                                     them
    span_turns                       list<int64>: the turn index of each trained span (format
                                     3; re-anchored episodes, null otherwise: span j is turn j)
    teacher_spans                    list<fixed_size_list<int64, 2>>: [start, end) of the
                                     turns the teacher wrote (format 3, re-anchoring); context
                                     of the spans around them, never trained as samples

Each array keeps its own dtype (float32 log-probs and entropies, int64 student ids, int32 teacher
ids from the wire). [T,K] arrays are lists of fixed-size rows rather than a flat list plus a
width column: the width lives in the schema, so every reader sees rows of K values, and an
empty completion still reads back as [0, K]. Optional arrays that are None (teacher fields the
score request did not ask for) are null.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from opd.client.train.positions import ROLLOUT_SUFFIX, STUDENT_FIELDS, TEACHER_FIELDS

if TYPE_CHECKING:
    import pyarrow as pa

    from opd.client.train.rollouts import Rollout

__all__ = [
    "FORMAT_VERSION",
    "RolloutWriter",
    "SavedRollout",
    "decode_pieces",
    "rollout_arrays",
    "read_rollouts",
    "read_step",
    "saved_steps",
    "step_path",
]

ROLLOUTS_DIR = "rollouts"
FORMAT_VERSION = 3  # 2: episodes (spans and the episode columns); 3: teacher-written turns
_VERSION_KEY = b"opd.rollouts.version"
_STEP_FILE = re.compile(r"^step_(\d+)\.parquet$")
TokenText = Callable[[list[int]], list[str]]


def rollout_arrays() -> dict[str, str]:
    """Column name -> Rollout attribute, for every per-position array of Rollout: each field
    whose name ends in a shape suffix of positions.ROLLOUT_SUFFIX, in the dataclass's order.

    Read off the dataclass rather than listed here, so an array added to Rollout is saved too."""
    from opd.client.train.rollouts import Rollout

    suffixes = sorted(set(ROLLOUT_SUFFIX.values()), key=len, reverse=True)  # _TK before _T
    out = {}
    for f in fields(Rollout):
        suffix = next((s for s in suffixes if f.name.endswith(s)), None)
        if suffix is not None:
            out[f.name[: -len(suffix)]] = f.name
    missing = set(STUDENT_FIELDS + TEACHER_FIELDS) - set(out)
    if missing:
        raise RuntimeError(f"Rollout lacks the schema's {sorted(missing)}")
    return out


def step_path(run_dir: Path | str, step: int) -> Path:
    """RUN_DIR/rollouts/step_{step:06d}.parquet."""
    return Path(run_dir) / ROLLOUTS_DIR / f"step_{step:06d}.parquet"


def saved_steps(run_dir: Path | str) -> list[int]:
    """The steps with a saved rollout file, ascending ([] when RUN_DIR/rollouts is absent)."""
    folder = Path(run_dir) / ROLLOUTS_DIR
    if not folder.is_dir():
        return []
    return sorted(int(m[1]) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name)))


def decode_pieces(tokenizer: Any) -> TokenText:
    """A token_text for RolloutWriter from a Hugging Face tokenizer: each id decoded on its own
    (special tokens kept, so an EOS shows as itself)."""

    def pieces(ids: list[int]) -> list[str]:
        return tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)

    return pieces


@dataclass(frozen=True)
class SavedRollout:
    """One row of a saved step: the Rollout, and the decoded text when the writer had it."""

    step: int
    rollout: Rollout
    completion_text: str | None
    token_pieces: list[str] | None
    context_texts: list[str] | None = None


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class RolloutWriter:
    """Saves each step's rollouts under RUN_DIR/rollouts/ (layout and columns: module docstring).

    token_text, when given, decodes a completion's ids into one string per token (e.g.
    `decode_pieces(tokenizer)`); it fills completion_text and token_pieces, which let the
    report show the text coloured token by token. Without it both columns are null.
    """

    def __init__(self, run_dir: Path | str, token_text: TokenText | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / ROLLOUTS_DIR
        self.token_text = token_text

    def write(self, step: int, rollouts: list[Rollout]) -> Path:
        """Write the step's file atomically and return its path; ValueError on ragged arrays."""
        import pyarrow.parquet as pq

        table = self._table(step, rollouts)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = step_path(self.run_dir, step)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def _table(self, step: int, rollouts: Sequence[Rollout]) -> pa.Table:
        import pyarrow as pa

        arrays = rollout_arrays()
        for i, r in enumerate(rollouts):
            _check_shapes(i, r, arrays)
        n = len(rollouts)
        columns: dict[str, pa.Array] = {
            "step": pa.array([step] * n, pa.int64()),
            "prompt_index": pa.array([r.prompt_index for r in rollouts], pa.int64()),
            "prompt_len": pa.array([r.prompt_len for r in rollouts], pa.int64()),
            "truncated": pa.array([bool(r.truncated) for r in rollouts], pa.bool_()),
            "token_ids": _list_column("token_ids", [r.token_ids for r in rollouts]),
        }
        if self.token_text is None:
            columns["completion_text"] = pa.nulls(n, pa.string())
            columns["token_pieces"] = pa.nulls(n, pa.list_(pa.string()))
        else:
            pieces = []
            for i, r in enumerate(rollouts):
                p = [str(s) for s in self.token_text([int(t) for t in r.completion])]
                if len(p) != r.completion_len:
                    raise ValueError(
                        f"rollout {i}: token_text gave {len(p)} pieces for "
                        f"{r.completion_len} completion tokens"
                    )
                pieces.append(p)
            columns["completion_text"] = pa.array(["".join(p) for p in pieces], pa.string())
            columns["token_pieces"] = pa.array(pieces, pa.list_(pa.string()))
        for name, attr in arrays.items():
            columns[name] = _list_column(name, [getattr(r, attr) for r in rollouts])
        version = 1
        if any(r.episode is not None for r in rollouts):
            columns.update(self._episode_columns(rollouts))
            version = 2
            if any(r.episode is not None and r.episode.teacher_spans for r in rollouts):
                columns.update(_reanchor_columns(rollouts))
                version = FORMAT_VERSION
        table = pa.table(columns)
        return table.replace_schema_metadata({_VERSION_KEY: str(version).encode()})

    def _episode_columns(self, rollouts: Sequence[Rollout]) -> dict[str, pa.Array]:
        import pyarrow as pa

        eps = [r.episode for r in rollouts]
        spans = [r.spans if r.episode is not None else None for r in rollouts]
        texts = None
        if self.token_text is not None:
            texts = [
                None
                if r.episode is None
                else [
                    "".join(self.token_text([int(t) for t in r.token_ids[a:b]]))
                    for a, b in _context_ranges(r)
                ]
                for r in rollouts
            ]
        return {
            "spans": _list_column("spans", spans),
            "context_roles": pa.array(
                [None if e is None else [",".join(x) for x in e.context_roles] for e in eps],
                pa.list_(pa.string()),
            ),
            "context_texts": pa.array(texts or [None] * len(eps), pa.list_(pa.string())),
            "ended": pa.array([None if e is None else e.ended for e in eps], pa.string()),
            "reward": pa.array([None if e is None else e.reward for e in eps], pa.float64()),
            "turn_correct": pa.array(
                [None if e is None else list(e.turn_correct) for e in eps], pa.list_(pa.bool_())
            ),
        }


def _reanchor_columns(rollouts: Sequence[Rollout]) -> dict[str, pa.Array]:
    """span_turns and teacher_spans (format 3): which turns the teacher wrote."""
    import pyarrow as pa

    eps = [r.episode for r in rollouts]
    turns = [
        None if e is None else (e.span_turns or list(range(len(r.scored_spans))))
        for r, e in zip(rollouts, eps, strict=True)
    ]
    teacher = [
        None if e is None else np.asarray(e.teacher_spans, dtype=np.int64).reshape(-1, 2)
        for e in eps
    ]
    return {
        "span_turns": pa.array(turns, pa.list_(pa.int64())),
        "teacher_spans": _list_column("teacher_spans", teacher),
    }


def _context_ranges(r: Rollout) -> list[tuple[int, int]]:
    """Per assistant turn, the [start, end) of the ids after it up to the next turn (the last
    turn's range runs to the end of token_ids: empty for an episode that ends on a turn)."""
    spans = r.scored_spans
    ends = [int(b) for _, b in spans]
    nexts = [int(a) for a, _ in spans[1:]] + [len(r.token_ids)]
    return list(zip(ends, nexts, strict=True))


def _check_shapes(i: int, r: Rollout, arrays: dict[str, str]) -> None:
    t = r.completion_len
    if np.ndim(r.token_ids) != 1 or not 0 <= r.prompt_len <= len(r.token_ids):
        raise ValueError(f"rollout {i}: token_ids must be 1-D with prompt_len <= its length")
    for name, attr in arrays.items():
        value = getattr(r, attr)
        if value is None:
            if name in STUDENT_FIELDS:
                raise ValueError(f"rollout {i}: {attr} is None")
            continue
        ndim = len(attr) - len(name) - 1  # "_T" -> 1, "_TK" / "_Tk" -> 2
        shape = np.shape(value)
        if len(shape) != ndim or shape[0] != t:
            want = "[T]" if ndim == 1 else "[T, K]"
            raise ValueError(f"rollout {i}: {attr} has shape {shape}, expected {want} with T={t}")


def _list_column(name: str, values: Sequence[np.ndarray | None]) -> pa.Array:
    """One list column from per-row arrays ([T] or [T, K]); None rows become nulls.

    The column's dtype is the rows' common dtype (np.result_type); rows of a step agree in
    practice, so each reads back with the dtype it was written with."""
    import pyarrow as pa

    present = [np.asarray(v) for v in values if v is not None]
    if not present:
        return pa.nulls(len(values), pa.list_(pa.float32()))
    dtype = np.result_type(*present)
    widths = {v.shape[1] for v in present if v.ndim == 2}
    if len(widths) > 1:
        raise ValueError(f"{name}: rows of different widths {sorted(widths)} in one step")
    lengths = [0 if v is None else len(v) for v in values]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([v.astype(dtype, copy=False).reshape(-1) for v in present])
    items: pa.Array = pa.array(flat, pa.from_numpy_dtype(dtype))
    if widths:
        items = pa.FixedSizeListArray.from_arrays(items, widths.pop())
    mask = pa.array([v is None for v in values], pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), items, mask=mask)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_step(
    run_dir: Path | str, step: int, columns: Sequence[str] | None = None
) -> dict[str, list[Any]]:
    """Columns of one saved step, row by row: list columns as numpy arrays ([T], or [T, K] for
    fixed-size rows) or Python lists of strings, nulls as None, scalars as Python values.

    Reads only those of `columns` the file has, when given (a report needs a few columns, not
    the top-k arrays); a column the file lacks is absent from the result."""
    import pyarrow.parquet as pq

    path = step_path(run_dir, step)
    if not path.is_file():
        raise FileNotFoundError(f"no saved rollouts for step {step}: {path} does not exist")
    if columns is not None:
        have = set(pq.read_schema(path).names)
        columns = [c for c in columns if c in have]
    table = pq.read_table(path, columns=columns)
    version = (table.schema.metadata or {}).get(_VERSION_KEY, b"1")
    if int(version) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: rollout format {int(version)}; this opd reads up to {FORMAT_VERSION}"
        )
    return {name: _column_rows(table.column(name)) for name in table.column_names}


def _column_rows(column: pa.ChunkedArray) -> list[Any]:
    import pyarrow as pa

    array = column.combine_chunks()
    kind = array.type
    if not pa.types.is_list(kind):
        return array.to_pylist()
    item = kind.value_type
    if not (pa.types.is_fixed_size_list(item) or _is_numeric(item)):
        return array.to_pylist()  # token_pieces: strings
    values = array.values
    if pa.types.is_fixed_size_list(item):
        flat = _to_numpy(values.flatten()).reshape(len(values), item.list_size)
    else:
        flat = _to_numpy(values)
    offsets = array.offsets.to_numpy()
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    return [
        flat[offsets[i] : offsets[i + 1]].copy() if valid[i] else None for i in range(len(array))
    ]


def _is_numeric(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _to_numpy(values: pa.Array) -> np.ndarray:
    return values.to_numpy(zero_copy_only=False)


def read_rollouts(run_dir: Path | str, steps: list[int] | None = None) -> list[SavedRollout]:
    """The saved rollouts of `steps` (default: every saved step), by step, in each step's order.

    Each comes back as the Rollout the trainer had: the same arrays, dtypes and shapes, teacher
    fields None where they were not asked for (and arrays a file predates None)."""
    from opd.client.train.rollouts import EpisodeInfo, Rollout

    arrays = rollout_arrays()
    out: list[SavedRollout] = []
    for step in saved_steps(run_dir) if steps is None else steps:
        cols = read_step(run_dir, step)
        n = len(cols["step"])
        texts = cols.get("completion_text", [None] * n)
        pieces = cols.get("token_pieces", [None] * n)
        spans = cols.get("spans", [None] * n)
        context_texts = cols.get("context_texts", [None] * n)
        for i in range(n):
            per_position = {
                attr: cols[name][i] if name in cols else None for name, attr in arrays.items()
            }
            episode = None
            if spans[i] is not None:
                episode = EpisodeInfo(
                    context_roles=[
                        [x for x in roles.split(",") if x] for roles in cols["context_roles"][i]
                    ],
                    reward=cols["reward"][i],
                    ended=cols["ended"][i],
                    turn_correct=list(cols["turn_correct"][i] or []),
                    span_turns=_optional(cols, "span_turns", i),
                    teacher_spans=_pairs(_optional(cols, "teacher_spans", i)),
                )
            rollout = Rollout(
                prompt_index=int(cols["prompt_index"][i]),
                token_ids=cols["token_ids"][i],
                prompt_len=int(cols["prompt_len"][i]),
                truncated=bool(cols["truncated"][i]),
                **per_position,
                spans=spans[i],
                episode=episode,
            )
            out.append(
                SavedRollout(
                    step=int(cols["step"][i]),
                    rollout=rollout,
                    completion_text=texts[i],
                    token_pieces=pieces[i],
                    context_texts=context_texts[i],
                )
            )
    return out


def _optional(cols: dict[str, Any], name: str, i: int) -> Any:
    """Row i of a column older formats lack (None when absent or null)."""
    column = cols.get(name)
    if column is None or column[i] is None:
        return None
    value = column[i]
    return [int(x) for x in value] if name == "span_turns" else value


def _pairs(rows: Any) -> list[tuple[int, int]]:
    """[start, end) pairs from a [S, 2] column row (none for a null row)."""
    return [] if rows is None else [(int(a), int(b)) for a, b in np.asarray(rows).reshape(-1, 2)]
