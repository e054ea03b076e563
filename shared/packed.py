"""Ragged batches as flat numpy arrays plus offsets: the in-memory form both encodings map to.

Notation (suffixes on array names): n = sequences in the batch, T = tokens summed over them,
N = scored positions summed over them, K = candidate ids per position, k = teacher top_k.

    PackedRequest: token_ids_T, seq_offsets_n1 (n+1), score_from_n, candidate_ids_NK,
                   optional span_offsets_n1 (n+1) and spans_S2 (S scored spans)
    PackedResult:  scored_offsets_n1 (n+1), token_logprobs_N, candidate_logprobs_NK,
                   top_k_ids_Nk, top_k_logprobs_Nk, entropy_N, token_ranks_N

Sequence i owns tokens token_ids_T[seq_offsets_n1[i]:seq_offsets_n1[i+1]] and scored rows
[scored_offsets_n1[i]:scored_offsets_n1[i+1]] of every per-position array. Its scored positions
(`scored_positions(i)`, absolute indices into its tokens) are score_from_n[i] .. L-1 when the
request has no spans; with spans (protocol 1.3) they are range(start, end) of each of its spans
spans_S2[span_offsets_n1[i]:span_offsets_n1[i+1]], in order. score_from_n[i] is always the
first scored position, so the tokens before it are a context every row shares. The server never
builds Python lists of tokens for the binary path; the JSON path converts once at the edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from opd.shared.errors import ContractError
from opd.shared.schemas import ScoreOptions, ScoreRequest
from opd.shared.version import PROTOCOL_VERSION


def offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


# The per-position arrays of a result by PackedResult's names (which the backends' rows of one
# item, opd.modeling.scoring.ScoredRows, share), each with its SequenceScores name.
ROW_ARRAYS = {
    "token_logprobs_N": "token_logprobs",
    "candidate_logprobs_NK": "candidate_logprobs",
    "top_k_ids_Nk": "top_k_ids",
    "top_k_logprobs_Nk": "top_k_logprobs",
    "entropy_N": "entropy",
    "token_ranks_N": "token_ranks",
}


def slice_row_arrays(rows: Any, a: int, b: int) -> dict[str, Any]:
    """Rows a:b of each per-position array of `rows` (a PackedResult, or anything with its
    array names), by name; None where the array is None."""
    arrays = {name: getattr(rows, name) for name in ROW_ARRAYS}
    return {name: None if x is None else x[a:b] for name, x in arrays.items()}


def concat_row_arrays(parts: Sequence[Any]) -> dict[str, Any]:
    """Each per-position array of consecutive `parts` (PackedResults, or anything with their
    array names) joined into one, by name; None where any part has none."""
    arrays = {name: [getattr(p, name) for p in parts] for name in ROW_ARRAYS}
    return {
        name: None if any(x is None for x in xs) else np.concatenate(xs)
        for name, xs in arrays.items()
    }


def positions_of_spans(spans_S2: np.ndarray) -> np.ndarray:
    """range(start, end) of each [start, end) row of `spans_S2`, concatenated (int64)."""
    spans = np.asarray(spans_S2, dtype=np.int64).reshape(-1, 2)
    widths = spans[:, 1] - spans[:, 0]
    offs = offsets_from_lengths(widths)
    return np.arange(offs[-1], dtype=np.int64) + np.repeat(spans[:, 0] - offs[:-1], widths)


@dataclass
class PackedRequest:
    token_ids_T: np.ndarray
    seq_offsets_n1: np.ndarray
    score_from_n: np.ndarray
    candidate_ids_NK: np.ndarray | None = None
    options: ScoreOptions = field(default_factory=ScoreOptions)
    # Scored spans (protocol 1.3), both or neither: sequence i owns the [start, end) rows
    # spans_S2[span_offsets_n1[i]:span_offsets_n1[i+1]] (int64 [n+1] and int64 [S, 2]).
    # None: every sequence is scored from score_from_n on (a request before 1.3).
    span_offsets_n1: np.ndarray | None = None
    spans_S2: np.ndarray | None = None

    @property
    def n_sequences(self) -> int:
        return len(self.seq_offsets_n1) - 1

    @property
    def has_spans(self) -> bool:
        return self.spans_S2 is not None

    # Derived once per request (the arrays are never reassigned after packing): the batcher
    # and the validator index them per sequence, which must not re-run a cumsum each time.
    @cached_property
    def seq_lens_n(self) -> np.ndarray:
        return np.diff(self.seq_offsets_n1)

    @cached_property
    def n_scored_n(self) -> np.ndarray:
        """Scored positions per sequence (meaningful once the request is validated)."""
        if self.spans_S2 is None or self.span_offsets_n1 is None:
            return self.seq_lens_n - self.score_from_n
        spans = self.spans_S2.reshape(-1, 2)
        within = offsets_from_lengths(spans[:, 1] - spans[:, 0])
        so = self.span_offsets_n1
        return within[so[1:]] - within[so[:-1]]

    @cached_property
    def scored_offsets_n1(self) -> np.ndarray:
        return offsets_from_lengths(self.n_scored_n)

    def spans(self, i: int) -> np.ndarray:
        """Sequence i's scored spans as int64 [S_i, 2] rows [start, end); one span
        [score_from, L] for a request without spans."""
        if self.spans_S2 is None or self.span_offsets_n1 is None:
            return np.array([[self.score_from_n[i], self.seq_lens_n[i]]], dtype=np.int64)
        so = self.span_offsets_n1
        return self.spans_S2[so[i] : so[i + 1]]

    def scored_positions(self, i: int) -> np.ndarray:
        """Absolute positions (indices into tokens(i)) of sequence i's rows, in row order."""
        if self.spans_S2 is None:
            return np.arange(int(self.score_from_n[i]), int(self.seq_lens_n[i]), dtype=np.int64)
        return positions_of_spans(self.spans(i))

    @property
    def n_candidates(self) -> int:
        return 0 if self.candidate_ids_NK is None else int(self.candidate_ids_NK.shape[1])

    def tokens(self, i: int) -> np.ndarray:
        return self.token_ids_T[self.seq_offsets_n1[i] : self.seq_offsets_n1[i + 1]]

    def candidates(self, i: int) -> np.ndarray | None:
        if self.candidate_ids_NK is None:
            return None
        offs = self.scored_offsets_n1
        return self.candidate_ids_NK[offs[i] : offs[i + 1]]

    @classmethod
    def from_request(cls, request: ScoreRequest) -> PackedRequest:
        """Pack a pydantic ScoreRequest; checks score_from / score_spans (exactly one per
        sequence) and the candidate matrix shape (ragged lists)."""
        try:
            return cls._from_request(request)
        except OverflowError:
            # pydantic accepts any Python int; ids beyond int64 must still be a clean 422.
            raise ContractError(
                "token ids, score_from, score_spans and candidate ids must fit in int32",
                field="sequences",
                limit=2**31 - 1,
            ) from None

    @classmethod
    def _from_request(cls, request: ScoreRequest) -> PackedRequest:
        seqs = request.sequences
        lengths = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=len(seqs))
        token_ids = np.fromiter(
            (t for s in seqs for t in s.token_ids), dtype=np.int64, count=int(lengths.sum())
        )
        _check_int32("sequences[].token_ids", token_ids)
        for i, s in enumerate(seqs):  # the schema's own rule, said as pydantic says its own
            if s.score_from is not None and s.score_spans is not None:
                where = f"sequences[{i}].score_spans"
                raise ContractError(
                    f"{where}: give exactly one of score_from and score_spans, not both",
                    field=where,
                )
            if s.score_from is None and s.score_spans is None:
                where = f"sequences[{i}].score_from"
                raise ContractError(
                    f"{where}: Field required (or score_spans instead: exactly one of the two)",
                    field=where,
                )
        with_spans = any(s.score_spans is not None for s in seqs)
        span_offsets = spans = None
        if with_spans:
            # One span [score_from, L] for a sequence given with score_from: the same rows.
            per_seq: list[list[tuple[int, int]]] = []
            for i, s in enumerate(seqs):
                if s.score_spans is not None:
                    per_seq.append(list(s.score_spans))
                    continue
                sf, length = int(s.score_from), len(s.token_ids)  # type: ignore[arg-type]
                if not 1 <= sf <= length - 1:  # named as score_from, as without spans
                    raise score_from_range_error(i, sf, length)
                per_seq.append([(sf, length)])
            span_offsets = offsets_from_lengths(np.array([len(p) for p in per_seq], np.int64))
            spans = np.array([x for p in per_seq for pair in p for x in pair], dtype=np.int64)
            _check_int32("sequences[].score_spans", spans)
            spans = spans.reshape(-1, 2)
            score_from = np.array([p[0][0] for p in per_seq], dtype=np.int64)
            n_scored_n = [sum(max(b - a, 0) for a, b in p) for p in per_seq]
        else:
            score_from = np.fromiter((s.score_from for s in seqs), dtype=np.int64, count=len(seqs))
            _check_int32("sequences[].score_from", score_from)
            n_scored_n = [len(s.token_ids) - s.score_from for s in seqs]  # type: ignore[operator]
        with_cands = [s.candidate_ids is not None for s in seqs]
        candidates: np.ndarray | None = None
        if any(with_cands):
            if not all(with_cands):
                i = with_cands.index(False)
                raise ContractError(
                    "candidate_ids must be given for every sequence or for none",
                    field=f"sequences[{i}].candidate_ids",
                )
            k = len(seqs[0].candidate_ids[0]) if seqs[0].candidate_ids else 0
            rows: list[list[int]] = []
            for i, s in enumerate(seqs):
                n_scored = n_scored_n[i]
                cands = s.candidate_ids or []
                if len(cands) != max(n_scored, 0):
                    how = (
                        "the positions of its score_spans"
                        if s.score_spans is not None
                        else "len(token_ids) - score_from"
                    )
                    raise ContractError(
                        f"candidate_ids has {len(cands)} rows but the sequence has "
                        f"{n_scored} scored positions ({how})",
                        field=f"sequences[{i}].candidate_ids",
                        limit=n_scored,
                    )
                for j, row in enumerate(cands):
                    if len(row) != k:
                        raise ContractError(
                            f"candidate_ids rows must all hold the same number of ids ({k}); "
                            f"this row holds {len(row)}",
                            field=f"sequences[{i}].candidate_ids[{j}]",
                            limit=k,
                        )
                rows.extend(cands)
            candidates = np.asarray(rows, dtype=np.int64).reshape(len(rows), k)
            _check_int32("sequences[].candidate_ids", candidates)
            candidates = candidates.astype(np.int32)
        return cls(
            token_ids_T=token_ids.astype(np.int32),
            seq_offsets_n1=offsets_from_lengths(lengths),
            score_from_n=score_from,
            candidate_ids_NK=candidates,
            options=ScoreOptions.model_validate(request.model_dump(exclude={"sequences"})),
            span_offsets_n1=span_offsets,
            spans_S2=spans,
        )

    @classmethod
    def from_arrays(
        cls,
        sequences: Sequence[np.ndarray | Sequence[int]],
        score_from: Sequence[int] | None,
        candidate_ids: Sequence[np.ndarray] | None = None,
        options: ScoreOptions | None = None,
        spans: Sequence[Sequence[tuple[int, int]]] | None = None,
    ) -> PackedRequest:
        """Pack per-sequence arrays (what a trainer holds) without building pydantic lists.

        `spans`: per sequence, its scored [start, end) ranges; with them `score_from` may be
        None (it is then each sequence's first span start; given, it must equal that start).
        `candidate_ids[i]` has one row per scored position of sequence i."""
        arrays = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        token_ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        _check_int32("token_ids", token_ids)
        cands = None
        if candidate_ids is not None:
            mats = [np.asarray(c, dtype=np.int64) for c in candidate_ids]
            cands = np.concatenate([m.reshape(len(m), -1) for m in mats]).astype(np.int32)
        span_offsets = spans_S2 = None
        if spans is not None:
            if len(spans) != len(arrays):
                raise ValueError(f"spans for {len(spans)} sequences, not {len(arrays)}")
            per_seq = [np.asarray(p, dtype=np.int64).reshape(-1, 2) for p in spans]
            span_offsets = offsets_from_lengths(np.array([len(p) for p in per_seq], np.int64))
            spans_S2 = np.concatenate(per_seq) if per_seq else np.zeros((0, 2), np.int64)
            if score_from is None:
                # A sequence without spans is refused by validation; 0 only fills its slot.
                score_from = [int(p[0, 0]) if len(p) else 0 for p in per_seq]
        elif score_from is None:
            raise ValueError("give score_from or spans")
        return cls(
            token_ids_T=token_ids.astype(np.int32),
            seq_offsets_n1=offsets_from_lengths(lengths),
            score_from_n=np.asarray(score_from, dtype=np.int64),
            candidate_ids_NK=cands,
            options=options or ScoreOptions(),
            span_offsets_n1=span_offsets,
            spans_S2=spans_S2,
        )

    def subset(self, indices: Sequence[int]) -> PackedRequest:
        """The sequences at `indices`, in that order, as a new request with the same options
        (their spans and candidate rows travel with them)."""
        scored = self.scored_offsets_n1
        toks = [self.tokens(i) for i in indices]
        cands = None
        if self.candidate_ids_NK is not None:
            cands = np.concatenate(
                [self.candidate_ids_NK[scored[i] : scored[i + 1]] for i in indices]
            ).reshape(-1, self.n_candidates)
        span_offsets = spans = None
        if self.spans_S2 is not None:
            parts = [self.spans(i) for i in indices]
            span_offsets = offsets_from_lengths(np.array([len(p) for p in parts], np.int64))
            spans = np.concatenate(parts).reshape(-1, 2) if parts else np.zeros((0, 2), np.int64)
        return PackedRequest(
            token_ids_T=np.concatenate(toks) if toks else np.zeros(0, dtype=np.int32),
            seq_offsets_n1=offsets_from_lengths(np.array([len(t) for t in toks], dtype=np.int64)),
            score_from_n=self.score_from_n[list(indices)].copy(),
            candidate_ids_NK=cands,
            options=self.options,
            span_offsets_n1=span_offsets,
            spans_S2=spans,
        )


def score_from_range_error(i: int, score_from: int, length: int) -> ContractError:
    """The refusal of sequence i's score_from outside [1, length - 1]."""
    return ContractError(
        f"score_from={score_from} is out of range: it must lie in [1, len(token_ids) - 1] "
        f"= [1, {length - 1}]",
        field=f"sequences[{i}].score_from",
        limit=length - 1,
    )


def _check_int32(field_name: str, values: np.ndarray) -> None:
    if values.size and (values.min() < np.iinfo(np.int32).min or values.max() >= 2**31):
        raise ContractError("token ids must fit in int32", field=field_name, limit=2**31 - 1)


@dataclass
class SequenceScores:
    """The teacher's numbers for one sequence; every array has n_scored rows."""

    token_logprobs: np.ndarray
    candidate_logprobs: np.ndarray | None = None
    top_k_ids: np.ndarray | None = None
    top_k_logprobs: np.ndarray | None = None
    entropy: np.ndarray | None = None
    token_ranks: np.ndarray | None = None


@dataclass
class PackedResult:
    scored_offsets_n1: np.ndarray
    token_logprobs_N: np.ndarray
    candidate_logprobs_NK: np.ndarray | None = None
    top_k_ids_Nk: np.ndarray | None = None
    top_k_logprobs_Nk: np.ndarray | None = None
    entropy_N: np.ndarray | None = None
    token_ranks_N: np.ndarray | None = None
    model: str = ""
    temperature: float = 1.0
    logprob_dtype: str = "float32"
    protocol_version: str = PROTOCOL_VERSION
    input_tokens: int = 0

    @property
    def n_sequences(self) -> int:
        return len(self.scored_offsets_n1) - 1

    def sequence(self, i: int) -> SequenceScores:
        a, b = int(self.scored_offsets_n1[i]), int(self.scored_offsets_n1[i + 1])
        rows = slice_row_arrays(self, a, b)
        return SequenceScores(**{ROW_ARRAYS[name]: x for name, x in rows.items()})

    def sequences(self) -> list[SequenceScores]:
        return [self.sequence(i) for i in range(self.n_sequences)]

    def cast(self, dtype: str) -> PackedResult:
        """The same result with float arrays in `dtype` (float16 halves the payload)."""
        np_dtype = np.dtype(dtype)

        def c(x: np.ndarray | None) -> np.ndarray | None:
            return None if x is None else x.astype(np_dtype, copy=False)

        return PackedResult(
            scored_offsets_n1=self.scored_offsets_n1,
            token_logprobs_N=c(self.token_logprobs_N),
            candidate_logprobs_NK=c(self.candidate_logprobs_NK),
            top_k_ids_Nk=self.top_k_ids_Nk,
            top_k_logprobs_Nk=c(self.top_k_logprobs_Nk),
            entropy_N=c(self.entropy_N),
            token_ranks_N=self.token_ranks_N,
            model=self.model,
            temperature=self.temperature,
            logprob_dtype=dtype,
            protocol_version=self.protocol_version,
            input_tokens=self.input_tokens,
        )

    @staticmethod
    def concat(parts: Sequence[PackedResult]) -> PackedResult:
        """Join results of consecutive sub-requests back into one (client-side splitting)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        scored = offsets_from_lengths(np.concatenate([np.diff(p.scored_offsets_n1) for p in parts]))
        return PackedResult(
            scored_offsets_n1=scored,
            **concat_row_arrays(parts),
            model=first.model,
            temperature=first.temperature,
            logprob_dtype=first.logprob_dtype,
            protocol_version=first.protocol_version,
            input_tokens=sum(p.input_tokens for p in parts),
        )
