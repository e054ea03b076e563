"""Prompt selection, the pure part: normalisation, dedupe, score combination, OOD mixing, output.

`opd select-prompts` (opd.client.recipes.select_prompts) ranks a prompt pool by its alignment
with the teacher, as the method's "teacher-aligned prompts" recovery step asks: prompts from the
teacher's post-training distribution, deduplicated against other sets (exact, and embedding
cosine >= 0.6), with a share of out-of-distribution (OOD) prompts mixed back in because aligned
prompts alone lower the student's entropy. Everything here is numpy and the standard library, so
it is tested without a model; the scoring (teacher, student) lives in select_prompts.py.

Notation: n = prompts of a set, d = embedding width; embeddings are L2-normalised rows, so a
cosine is a dot product.

Definitions:
    normalise(t)         casefold, collapse every whitespace run to one space, strip
                         punctuation (Unicode category P*) and spaces at both ends.
    exact duplicate      equal normalise() of two prompts.
    near duplicate       cos(e_a, e_b) >= threshold.
    percentile rank      PR(x; ref) = (#{r in ref: r < x} + #{r in ref: r == x} / 2) / |ref|,
                         over the non-nan values of ref; nan for a nan x. In (0, 1): the pool's
                         best prompt sits near 1 and its worst near 0, whatever the score's unit.
    combined score       mean over the available scores of their percentile ranks in the pool.
    OOD count            round_half_up(fraction * count).
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Rows per block when comparing embeddings, so memory stays O(block * n), not O(n * n).
_BLOCK = 1024
# With no --ood file, OOD prompts come from this least-aligned share of the pool prompts that
# were not selected as aligned (at least as many as needed), sampled uniformly at random.
OOD_POOL_TAIL = 0.5


class SelectionError(ValueError):
    """A request that cannot be met (bad settings, too few prompts left); the message says why."""


# --------------------------------------------------------------------------------------------
# Text and spans
# --------------------------------------------------------------------------------------------


def _is_edge(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith("P")


def normalise(text: str) -> str:
    """The key of exact dedupe (see the module docstring)."""
    t = " ".join(text.casefold().split())
    start, end = 0, len(t)
    while start < end and _is_edge(t[start]):
        start += 1
    while end > start and _is_edge(t[end - 1]):
        end -= 1
    return t[start:end]


def content_span(ids: Sequence[int], empty_ids: Sequence[int]) -> tuple[int, int]:
    """[start, end) of a user message's own tokens in its chat-template rendering `ids`.

    `empty_ids` renders the same template with an empty message: the template's tokens are the
    common prefix and the common suffix of the two (never overlapping, in either sequence)."""
    limit = min(len(ids), len(empty_ids))
    prefix = 0
    while prefix < limit and ids[prefix] == empty_ids[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and ids[-1 - suffix] == empty_ids[-1 - suffix]:
        suffix += 1
    return prefix, len(ids) - suffix


# --------------------------------------------------------------------------------------------
# Dedupe
# --------------------------------------------------------------------------------------------


@dataclass
class Removed:
    """Why a prompt was left out: one row of `<out stem>.removed.jsonl`."""

    prompt: str
    set: str  # "pool" or "ood"
    index: int  # row in its file
    reason: str  # "exact", "near" or "too_long"
    matched: str | None = None  # the prompt it duplicates
    matched_set: str | None = None  # "pool", "ood", or a --dedupe-against path
    matched_index: int | None = None
    similarity: float | None = None  # cosine, for "near"
    tokens: int | None = None  # rendered prompt tokens, for "too_long"


@dataclass(frozen=True)
class TextSet:
    """A named list of prompts; `indices` are their rows in the original file."""

    name: str
    texts: list[str]
    indices: list[int]

    @staticmethod
    def of(name: str, texts: Sequence[str]) -> TextSet:
        return TextSet(name, list(texts), list(range(len(texts))))

    def take(self, positions: Sequence[int]) -> TextSet:
        return TextSet(
            self.name, [self.texts[p] for p in positions], [self.indices[p] for p in positions]
        )


def exact_dedupe(
    candidates: TextSet, references: Sequence[TextSet] = ()
) -> tuple[list[int], list[Removed]]:
    """Positions of `candidates` to keep, and why the others went.

    A candidate goes when its normalised text equals one of any reference set, or one of an
    earlier candidate (the first occurrence stays)."""
    seen: dict[str, tuple[str, int, str]] = {}  # key -> (set, index, text), first wins
    for ref in references:
        for text, idx in zip(ref.texts, ref.indices, strict=True):
            seen.setdefault(normalise(text), (ref.name, idx, text))
    keep: list[int] = []
    removed: list[Removed] = []
    for pos, (text, idx) in enumerate(zip(candidates.texts, candidates.indices, strict=True)):
        key = normalise(text)
        if key in seen:
            m_set, m_idx, m_text = seen[key]
            removed.append(Removed(text, candidates.name, idx, "exact", m_text, m_set, m_idx))
            continue
        seen[key] = (candidates.name, idx, text)
        keep.append(pos)
    return keep, removed


def max_cosine(query_qd: np.ndarray, ref_rd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query row: the highest cosine to any reference row, and which row ([q], [q])."""
    q = query_qd.shape[0]
    best_q = np.full(q, -np.inf, dtype=np.float32)
    arg_q = np.full(q, -1, dtype=np.int64)
    if ref_rd.shape[0] == 0:
        return best_q, arg_q
    for a in range(0, q, _BLOCK):
        sims_br = query_qd[a : a + _BLOCK] @ ref_rd.T
        arg_q[a : a + _BLOCK] = sims_br.argmax(axis=1)
        best_q[a : a + _BLOCK] = sims_br.max(axis=1)
    return best_q, arg_q


def near_dedupe_against(
    candidates: TextSet,
    emb_nd: np.ndarray,
    references: Sequence[tuple[TextSet, np.ndarray]],
    threshold: float,
) -> tuple[list[int], list[Removed]]:
    """Positions of `candidates` with cosine < threshold to every row of every reference set."""
    best_n = np.full(len(candidates.texts), -np.inf, dtype=np.float32)
    match: list[tuple[TextSet, int] | None] = [None] * len(candidates.texts)
    for ref, ref_emb in references:
        sims_n, arg_n = max_cosine(emb_nd, ref_emb)
        for pos in np.flatnonzero(sims_n > best_n):
            best_n[pos] = sims_n[pos]
            match[pos] = (ref, int(arg_n[pos]))
    keep: list[int] = []
    removed: list[Removed] = []
    for pos, text in enumerate(candidates.texts):
        hit = match[pos]
        if hit is None or best_n[pos] < threshold:
            keep.append(pos)
            continue
        ref, r = hit
        removed.append(
            Removed(
                text,
                candidates.name,
                candidates.indices[pos],
                "near",
                ref.texts[r],
                ref.name,
                ref.indices[r],
                round(float(best_n[pos]), 4),
            )
        )
    return keep, removed


def near_dedupe_greedy(
    candidates: TextSet, emb_nd: np.ndarray, order: Sequence[int], threshold: float
) -> tuple[list[int], list[Removed]]:
    """Walk `order` (positions, best first) and keep a prompt unless it is a near duplicate of
    one already kept; so of two near duplicates the one earlier in `order` stays.

    Returns the kept positions in `order`'s order. Blockwise: each block of candidates is
    compared with everything kept before it in one matmul, then resolved within itself."""
    order = list(order)
    d = emb_nd.shape[1] if emb_nd.ndim == 2 else 0
    kept_emb = np.zeros((len(order), d), dtype=np.float32)
    kept: list[int] = []
    removed: list[Removed] = []

    def drop(pos: int, other: int, sim: float) -> None:
        removed.append(
            Removed(
                candidates.texts[pos],
                candidates.name,
                candidates.indices[pos],
                "near",
                candidates.texts[other],
                candidates.name,
                candidates.indices[other],
                round(sim, 4),
            )
        )

    for a in range(0, len(order), _BLOCK):
        block = order[a : a + _BLOCK]
        block_bd = emb_nd[block]
        before_b, arg_b = max_cosine(block_bd, kept_emb[: len(kept)])
        within_bb = block_bd @ block_bd.T
        kept_here: list[int] = []  # positions within the block
        for j, pos in enumerate(block):
            if before_b[j] >= threshold:
                drop(pos, kept[int(arg_b[j])], float(before_b[j]))
                continue
            if kept_here:
                sims = within_bb[j, kept_here]
                best = int(np.argmax(sims))
                if sims[best] >= threshold:
                    drop(pos, block[kept_here[best]], float(sims[best]))
                    continue
            kept_here.append(j)
        for j in kept_here:
            kept_emb[len(kept)] = block_bd[j]
            kept.append(block[j])
    return kept, removed


# --------------------------------------------------------------------------------------------
# Scores and ranking
# --------------------------------------------------------------------------------------------


def percentile_ranks(values: Any, reference: Any | None = None) -> np.ndarray:
    """PR(x; reference) for every x in `values` (reference defaults to values); see docstring."""
    x_n = np.asarray(values, dtype=np.float64)
    ref = x_n if reference is None else np.asarray(reference, dtype=np.float64)
    ref_sorted = np.sort(ref[~np.isnan(ref)])
    out_n = np.full(x_n.shape, np.nan)
    if ref_sorted.size == 0:
        return out_n
    ok_n = ~np.isnan(x_n)
    below = np.searchsorted(ref_sorted, x_n[ok_n], side="left")
    upto = np.searchsorted(ref_sorted, x_n[ok_n], side="right")
    # (#less + #equal / 2) / |ref|
    out_n[ok_n] = (below + 0.5 * (upto - below)) / ref_sorted.size
    return out_n


def combine_percentiles(percentiles: Sequence[Any]) -> np.ndarray:
    """Mean of the available (non-nan) percentile ranks per prompt; nan when none is."""
    stack_sn = np.vstack([np.asarray(p, dtype=np.float64) for p in percentiles])
    count_n = (~np.isnan(stack_sn)).sum(axis=0)
    total_n = np.nansum(stack_sn, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count_n > 0, total_n / np.maximum(count_n, 1), np.nan)


def rank_order(key_n: Any) -> np.ndarray:
    """Positions sorted best (highest key) first; nan keys last; ties keep input order."""
    key = np.asarray(key_n, dtype=np.float64)
    sortable = np.where(np.isnan(key), np.inf, -key)
    return np.argsort(sortable, kind="stable")


# --------------------------------------------------------------------------------------------
# Mixing in out-of-distribution prompts
# --------------------------------------------------------------------------------------------


def ood_count(count: int, fraction: float) -> int:
    """round_half_up(fraction * count), after checking both."""
    if count < 1:
        raise SelectionError(f"--count must be at least 1, got {count}")
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise SelectionError(f"--ood-fraction must be in [0, 1], got {fraction}")
    return math.floor(fraction * count + 0.5)


@dataclass(frozen=True)
class Mix:
    aligned: list[int]  # pool positions, best first
    ood: list[int]  # pool positions (ood_from_pool) or OOD-set positions, in sampled order
    ood_from_pool: bool


def mix(
    ranked: Sequence[int],
    count: int,
    n_ood: int,
    rng: np.random.Generator,
    ood_candidates: Sequence[int] | None = None,
) -> Mix:
    """The top (count - n_ood) of `ranked` plus n_ood OOD prompts.

    With `ood_candidates` (positions in a separate OOD set, already deduped and shuffled by the
    caller) the first n_ood are taken. Without, they are sampled at random from the
    least-aligned OOD_POOL_TAIL share of the ranked prompts left after the aligned ones."""
    ranked = list(ranked)
    n_aligned = count - n_ood
    if ood_candidates is not None:
        if n_aligned > len(ranked):
            raise SelectionError(
                f"asked for {n_aligned} aligned prompts ({count} - {n_ood} OOD) but only "
                f"{len(ranked)} pool prompts are left after dedupe and length filtering"
            )
        if n_ood > len(ood_candidates):
            raise SelectionError(
                f"asked for {n_ood} OOD prompts but only {len(ood_candidates)} are left in the "
                "--ood set after dedupe and length filtering"
            )
        return Mix(ranked[:n_aligned], list(ood_candidates[:n_ood]), ood_from_pool=False)
    if count > len(ranked):
        raise SelectionError(
            f"asked for {count} prompts ({n_aligned} aligned + {n_ood} OOD from the pool) but "
            f"only {len(ranked)} pool prompts are left after dedupe and length filtering"
        )
    remainder = ranked[n_aligned:]
    tail_size = max(n_ood, math.ceil(len(remainder) * OOD_POOL_TAIL))
    tail = remainder[len(remainder) - tail_size :] if tail_size else []
    picked = rng.choice(len(tail), size=n_ood, replace=False) if n_ood else []
    return Mix(ranked[:n_aligned], [tail[int(i)] for i in picked], ood_from_pool=True)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

# The selected set's columns. `prompt` is what `opd train --prompts` reads (load_prompts).
OUTPUT_COLUMNS: dict[str, str] = {
    "prompt": "string",
    "source": "string",  # "aligned" or "ood"
    "origin": "string",  # "pool" or "ood-file"
    "index": "int64",  # row in its file
    "rank": "int64",  # in the pool ranking (1 = best); null for prompts of the --ood file
    "teacher_logprob": "float64",
    "student_overlap": "float64",
    "combined": "float64",
}


def _jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, nan as null, containers recursively."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_rows(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write rows as JSONL or Parquet, chosen by the suffix; nan becomes null."""
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise SelectionError(f"--out must end in .jsonl or .parquet, got {out.name!r}")
    clean = [{k: _jsonable(v) for k, v in row.items()} for row in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".jsonl":
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in clean))
        return out
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(clean[0]) if clean else list(OUTPUT_COLUMNS)
    schema = pa.schema([(c, pa.type_for_alias(OUTPUT_COLUMNS.get(c, "string"))) for c in columns])
    pq.write_table(pa.Table.from_pylist(clean, schema=schema), out)
    return out


def side_path(out: str | Path, what: str) -> Path:
    """`<out stem>.<what>` next to the output file (what = "summary.json", "removed.jsonl")."""
    p = Path(out)
    return p.with_name(f"{p.stem}.{what}")


def write_removed(path: str | Path, removed: Sequence[Removed]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in removed))
    return out


def write_summary(path: str | Path, summary: dict[str, Any]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(summary), indent=2, ensure_ascii=False) + "\n")
    return out
