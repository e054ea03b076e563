"""What every drop-in route asks of the teacher, scored through the one scoring path.

vLLM's, SGLang's and TRL's routes all ask the same three things of a prompt (token ids): per
position, the actual token's log-prob and rank plus the top-k; per position, log-probs at
caller-chosen ids; and, with `max_tokens: 1`, the token that comes next. `score_prompts` turns a
request's prompts into one PackedRequest, checked by the same validation as POST /v1/score's
and scored by the same batcher, and slices the answer back per prompt; the route modules only
change shapes and apply their own servers' rules (vLLM's, SGLang's, TRL's), never the limits.

Positions, in vLLM's terms: prompt token p (1 <= p < L) is predicted by row p - 1 of the causal
rows. With `first_row = r` the rows r .. L-2 are scored, so `PromptScores` row j is about prompt
token r + j + 1. The next token (max_tokens 1) is the greedy choice at row L - 1: the prompt is
scored with one placeholder id appended, whose own log-prob is discarded, so the next-token row
costs one more position in the same forward pass rather than a second pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import numpy as np
from pydantic import AfterValidator, StrictInt
from pydantic_core import PydanticCustomError

from opd.server.dropin.errors import Terms, in_route_terms
from opd.shared.errors import ContractError
from opd.shared.packed import PackedRequest, offsets_from_lengths
from opd.shared.schemas import ScoreOptions

if TYPE_CHECKING:
    from opd.server.service import ScoringService

_INT64 = np.iinfo(np.int64)


def _within_int64(value: int) -> int:
    if not _INT64.min <= value <= _INT64.max:
        raise PydanticCustomError(
            "int64",
            "Input should fit in 64 bits: {ge} .. {le}",
            {"ge": _INT64.min, "le": _INT64.max},
        )
    return value


# Integers of the drop-in request models: strict (no bool, no float, no "4") and within int64,
# so that ids reach numpy as sent; JSON integers from 2**63 to 2**64 - 1 (which the parser
# hands over) are refused naming their field, not met as an OverflowError in numpy. (A
# validator rather than Field bounds: its name in a union's error path is one that
# opd.shared.codec leaves out of the field it reports.)
Int64 = Annotated[StrictInt, AfterValidator(_within_int64)]

# Appended to a prompt so the row after its last token (the next-token distribution) is
# scored; any valid id does, its own log-prob is never read.
_PLACEHOLDER_ID = 0


@dataclass
class PromptJob:
    """One prompt of a drop-in request and what is wanted of it.

    `top_k`: the teacher's own top-k per row (0 = none); `ranks`: the actual token's rank per
    row; `first_row`: the first causal row wanted (None: no prompt rows at all, only the next
    token or nothing); `candidate_ids`: a [L - 1 - first_row, M] id matrix, -1 = padding (scored
    as -inf), row i scored as predictions of prompt token first_row + i + 1; `next_token`: the
    greedy next token and its top-k row (max_tokens 1).
    """

    token_ids: np.ndarray
    first_row: int | None = 0
    top_k: int = 0
    ranks: bool = False
    candidate_ids: np.ndarray | None = None
    next_token: bool = False

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def grown(self) -> bool:
        """Its native sequence holds one token more than the prompt: the placeholder after it
        (for the next-token row, or to make a one-token prompt a sequence)."""
        return self.next_token or self.n_tokens == 1

    @property
    def wanted(self) -> bool:
        """Something is computed for it (else its answer is empty)."""
        return self.n_rows > 0 or self.next_token

    @property
    def n_rows(self) -> int:
        """Causal prompt rows scored (rows first_row .. L-2)."""
        if self.first_row is None:
            return 0
        return max(self.n_tokens - 1 - self.first_row, 0)


@dataclass
class PromptScores:
    """The teacher's numbers for one prompt: prompt rows (row j predicts token first_row+j+1),
    then, apart, the next-token row. Arrays are None when not asked for."""

    first_row: int | None
    token_logprobs: np.ndarray  # [R] float32
    token_ranks: np.ndarray | None  # [R] int32
    top_ids: np.ndarray | None  # [R, k] int32
    top_logprobs: np.ndarray | None  # [R, k] float32
    candidate_logprobs: np.ndarray | None  # [R, M] float32, -inf at padding
    next_top_ids: np.ndarray | None  # [k'] int32, greedy first
    next_top_logprobs: np.ndarray | None  # [k'] float32

    @property
    def next_token_id(self) -> int | None:
        return None if self.next_top_ids is None else int(self.next_top_ids[0])

    @classmethod
    def empty(cls, job: PromptJob) -> PromptScores:
        return cls(job.first_row, np.zeros(0, np.float32), None, None, None, None, None, None)


def native_request(jobs: list[PromptJob], temperature: float) -> PackedRequest:
    """The POST /v1/score request that asks for what `jobs` want: one sequence per job, in
    order, ids as int64 (as sent: validation sees them before any narrowing).

    A request has one top_k and one candidate width: the largest asked for; each prompt's
    answer is trimmed back to its own in `slice_scores`. A job with nothing to score is still
    a sequence, so that the one validation sees all of the caller's prompts; it scores its last
    row (its only token and a placeholder, when it has one token) and `score_prompts` leaves it
    out of what it submits. Candidate ids -1 pad a row (vLLM's rule) and are sent as id 0, their
    answers set to -inf afterwards; other negative ids go to validation as they are.
    """
    for i, job in enumerate(jobs):
        if job.n_tokens < 1:  # said in the route's terms by score_prompts
            raise ContractError("a prompt needs at least one token", field=f"sequences[{i}]")
    width = max((j.candidate_ids.shape[1] for j in jobs if j.candidate_ids is not None), default=0)
    seqs, score_from, cands = [], [], []
    for job in jobs:
        tokens, first = _sequence(job)
        seqs.append(tokens)
        score_from.append(first + 1)
        if width:
            block = np.zeros((len(tokens) - 1 - first, width), dtype=np.int64)
            if job.candidate_ids is not None:
                m = job.candidate_ids
                block[: m.shape[0], : m.shape[1]] = np.where(m == -1, 0, m)
            cands.append(block)
    options = ScoreOptions(
        top_k=max(max(j.top_k, int(j.next_token)) for j in jobs),
        token_rank=any(j.ranks for j in jobs),
        temperature=temperature,
    )
    return PackedRequest(
        token_ids_T=np.concatenate(seqs),
        seq_offsets_n1=offsets_from_lengths(np.array([len(t) for t in seqs], dtype=np.int64)),
        score_from_n=np.array(score_from, dtype=np.int64),
        candidate_ids_NK=np.concatenate(cands) if width else None,
        options=options,
    )


def _sequence(job: PromptJob) -> tuple[np.ndarray, int]:
    """A job's native token ids and its first causal row (score_from - 1)."""
    tokens = np.append(job.token_ids, _PLACEHOLDER_ID) if job.grown else job.token_ids
    if job.n_rows > 0:
        return tokens, job.first_row  # type: ignore[return-value]
    return tokens, len(tokens) - 2  # the next-token row, or the last row of the prompt


def _narrowed(req: PackedRequest, keep: list[int]) -> PackedRequest:
    """The sequences at `keep`, ids as the int32 the decoders give the batcher (safe once the
    request passed validation: every id is inside the vocabulary)."""
    out = req if len(keep) == req.n_sequences else req.subset(keep)
    cands = out.candidate_ids_NK
    return PackedRequest(
        token_ids_T=out.token_ids_T.astype(np.int32),
        seq_offsets_n1=out.seq_offsets_n1,
        score_from_n=out.score_from_n,
        candidate_ids_NK=None if cands is None else cands.astype(np.int32),
        options=out.options,
        span_offsets_n1=out.span_offsets_n1,
        spans_S2=out.spans_S2,
    )


def slice_scores(job: PromptJob, rows: dict[str, np.ndarray | None]) -> PromptScores:
    """One prompt's rows of the packed result, trimmed to what the job asked for."""
    n = job.n_rows

    def prompt_rows(x: np.ndarray | None, width: int | None = None) -> np.ndarray | None:
        if x is None:
            return None
        out = x[:n]
        return out if width is None else out[:, :width]

    cand = None
    if job.candidate_ids is not None and rows["candidate_logprobs"] is not None:
        m = job.candidate_ids
        cand = prompt_rows(rows["candidate_logprobs"], m.shape[1]).copy()
        cand[m < 0] = -np.inf
    next_ids = next_lps = None
    if job.next_token:
        width = max(job.top_k, 1)
        next_ids = rows["top_ids"][-1, :width]
        next_lps = rows["top_logprobs"][-1, :width]
    return PromptScores(
        first_row=job.first_row,
        token_logprobs=rows["token_logprobs"][:n],
        token_ranks=prompt_rows(rows["token_ranks"]) if job.ranks else None,
        top_ids=prompt_rows(rows["top_ids"], job.top_k) if job.top_k else None,
        top_logprobs=prompt_rows(rows["top_logprobs"], job.top_k) if job.top_k else None,
        candidate_logprobs=cand,
        next_top_ids=next_ids,
        next_top_logprobs=next_lps,
    )


async def score_prompts(
    service: ScoringService, jobs: list[PromptJob], temperature: float, terms: Terms
) -> list[PromptScores]:
    """Score every job through the service's batcher; one PromptScores per job, in order.

    The native request is checked by the service's one validation, as POST /v1/score's is; a
    refusal names the route's own field (`terms`). No prompts at all is an empty answer, as
    the routes' own servers give one."""
    if not jobs:
        return []
    try:
        req = native_request(jobs, temperature)
        service.check(req)
    except ContractError as exc:
        raise in_route_terms(exc, terms, [j.grown for j in jobs]) from None
    out = [PromptScores.empty(j) for j in jobs]
    wanted = [i for i, j in enumerate(jobs) if j.wanted]
    if not wanted:
        return out
    result = await service.score_packed(_narrowed(req, wanted))
    for seq, i in enumerate(wanted):
        s = result.sequence(seq)
        rows = {
            "token_logprobs": s.token_logprobs,
            "token_ranks": s.token_ranks,
            "top_ids": s.top_k_ids,
            "top_logprobs": s.top_k_logprobs,
            "candidate_logprobs": s.candidate_logprobs,
        }
        out[i] = slice_scores(jobs[i], rows)
    return out
