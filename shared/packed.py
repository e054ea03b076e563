"""Ragged batches as flat numpy arrays plus offsets: the in-memory form both encodings map to.

Notation (suffixes on array names): n = sequences in the batch, T = tokens summed over them,
N = scored positions summed over them, K = candidate ids per position, k = teacher top_k.

    PackedRequest: token_ids_T, seq_offsets_n1 (n+1), score_from_n, candidate_ids_NK
    PackedResult:  scored_offsets_n1 (n+1), token_logprobs_N, candidate_logprobs_NK,
                   top_k_ids_Nk, top_k_logprobs_Nk, entropy_N, token_ranks_N

Sequence i owns tokens token_ids_T[seq_offsets_n1[i]:seq_offsets_n1[i+1]] and scored rows
[scored_offsets_n1[i]:scored_offsets_n1[i+1]] of every per-position array. The server never
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


@dataclass
class PackedRequest:
    token_ids_T: np.ndarray
    seq_offsets_n1: np.ndarray
    score_from_n: np.ndarray
    candidate_ids_NK: np.ndarray | None = None
    options: ScoreOptions = field(default_factory=ScoreOptions)

    @property
    def n_sequences(self) -> int:
        return len(self.seq_offsets_n1) - 1

    # Derived once per request (the arrays are never reassigned after packing): the batcher
    # and the validator index them per sequence, which must not re-run a cumsum each time.
    @cached_property
    def seq_lens_n(self) -> np.ndarray:
        return np.diff(self.seq_offsets_n1)

    @cached_property
    def n_scored_n(self) -> np.ndarray:
        return self.seq_lens_n - self.score_from_n

    @cached_property
    def scored_offsets_n1(self) -> np.ndarray:
        return offsets_from_lengths(self.n_scored_n)

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
        """Pack a pydantic ScoreRequest; checks the candidate matrix shape (ragged lists)."""
        try:
            return cls._from_request(request)
        except OverflowError:
            # pydantic accepts any Python int; ids beyond int64 must still be a clean 422.
            raise ContractError(
                "token ids, score_from and candidate ids must fit in int32",
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
        score_from = np.fromiter((s.score_from for s in seqs), dtype=np.int64, count=len(seqs))
        _check_int32("sequences[].score_from", score_from)
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
                n_scored = len(s.token_ids) - s.score_from
                cands = s.candidate_ids or []
                if len(cands) != max(n_scored, 0):
                    raise ContractError(
                        f"candidate_ids has {len(cands)} rows but the sequence has "
                        f"{n_scored} scored positions (len(token_ids) - score_from)",
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
        )

    @classmethod
    def from_arrays(
        cls,
        sequences: Sequence[np.ndarray | Sequence[int]],
        score_from: Sequence[int],
        candidate_ids: Sequence[np.ndarray] | None = None,
        options: ScoreOptions | None = None,
    ) -> PackedRequest:
        """Pack per-sequence arrays (what a trainer holds) without building pydantic lists."""
        arrays = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        token_ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        _check_int32("token_ids", token_ids)
        cands = None
        if candidate_ids is not None:
            mats = [np.asarray(c, dtype=np.int64) for c in candidate_ids]
            cands = np.concatenate([m.reshape(len(m), -1) for m in mats]).astype(np.int32)
        return cls(
            token_ids_T=token_ids.astype(np.int32),
            seq_offsets_n1=offsets_from_lengths(lengths),
            score_from_n=np.asarray(score_from, dtype=np.int64),
            candidate_ids_NK=cands,
            options=options or ScoreOptions(),
        )

    def subset(self, indices: Sequence[int]) -> PackedRequest:
        """The sequences at `indices`, in that order, as a new request with the same options."""
        scored = self.scored_offsets_n1
        toks = [self.tokens(i) for i in indices]
        cands = None
        if self.candidate_ids_NK is not None:
            cands = np.concatenate(
                [self.candidate_ids_NK[scored[i] : scored[i + 1]] for i in indices]
            ).reshape(-1, self.n_candidates)
        return PackedRequest(
            token_ids_T=np.concatenate(toks) if toks else np.zeros(0, dtype=np.int32),
            seq_offsets_n1=offsets_from_lengths(np.array([len(t) for t in toks], dtype=np.int64)),
            score_from_n=self.score_from_n[list(indices)].copy(),
            candidate_ids_NK=cands,
            options=self.options,
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
