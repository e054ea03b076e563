"""What every drop-in route asks of the teacher, scored through the one scoring path.

vLLM's, SGLang's and TRL's routes all ask the same three things of a prompt (token ids): per
position, the actual token's log-prob and rank plus the top-k; per position, log-probs at
caller-chosen ids; and, with `max_tokens: 1`, the token that comes next. `score_prompts` turns a
request's prompts into one PackedRequest for the service's batcher, the same path as
POST /v1/score, and slices the answer back per prompt; the route modules only change shapes.

Positions, in vLLM's terms: prompt token p (1 <= p < L) is predicted by row p - 1 of the causal
rows. With `first_row = r` the rows r .. L-2 are scored, so `PromptScores` row j is about prompt
token r + j + 1. The next token (max_tokens 1) is the greedy choice at row L - 1: the prompt is
scored with one placeholder id appended, whose own log-prob is discarded, so the next-token row
costs one more position in the same forward pass rather than a second pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from opd.server.dropin.errors import bad_request
from opd.shared.errors import ContractError
from opd.shared.limits import Limits
from opd.shared.packed import PackedRequest, offsets_from_lengths
from opd.shared.schemas import ScoreOptions
from opd.shared.validation import validate_request

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
    candidates_field: str = "prompt_logprob_token_ids"  # what the route calls them, for errors

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

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


def check_jobs(jobs: list[PromptJob], limits: Limits, vocab_size: int, field: str) -> None:
    """Refuse (400) what the service would refuse, naming the route's own field."""
    if len(jobs) > limits.max_sequences:
        raise bad_request(
            f"{len(jobs)} prompts exceed max_sequences={limits.max_sequences}",
            field,
            limits.max_sequences,
        )
    total = 0
    for i, job in enumerate(jobs):
        name = f"{field}[{i}]" if len(jobs) > 1 else field
        n = job.n_tokens + int(job.next_token)
        if job.n_tokens < 1:
            raise bad_request("a prompt needs at least one token", name, 1)
        if n > limits.max_tokens_per_sequence:
            extra = " (prompt + the one generated token)" if job.next_token else ""
            raise bad_request(
                f"{n} tokens{extra} exceed max_tokens_per_sequence="
                f"{limits.max_tokens_per_sequence}",
                name,
                limits.max_tokens_per_sequence,
            )
        total += n
        ids = job.token_ids
        bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
        if bad.size:
            j = int(bad[0])
            raise bad_request(
                f"token id {int(ids[j])} at position {j} is outside the vocabulary "
                f"[0, {vocab_size})",
                name,
                vocab_size,
            )
        if job.top_k > limits.max_top_k:
            raise bad_request(
                f"{job.top_k} log-probs per position exceed max_top_k={limits.max_top_k}",
                "prompt_logprobs",
                limits.max_top_k,
            )
        if job.candidate_ids is not None:
            check_candidates(job, limits, vocab_size)
    if total > limits.max_total_tokens:
        raise bad_request(
            f"the request holds {total} tokens, over max_total_tokens={limits.max_total_tokens}",
            field,
            limits.max_total_tokens,
        )


def check_candidates(job: PromptJob, limits: Limits, vocab_size: int) -> None:
    """vLLM's rules for prompt_logprob_token_ids (and the routes' other candidate fields): a
    2-D integer matrix, ids in [-1, V), exactly L - 1 - start rows, at most max_candidates
    columns."""
    field = job.candidates_field
    ids = job.candidate_ids
    assert ids is not None and job.first_row is not None
    if ids.ndim != 2 or 0 in ids.shape:
        raise bad_request(f"{field} must be a non-empty integer matrix [num_rows, num_ids]", field)
    rows = job.n_tokens - 1 - job.first_row
    if ids.shape[0] != rows:
        raise bad_request(
            f"{field} has {ids.shape[0]} rows, but the prompt has {rows} scored rows "
            f"(prompt_len - 1 - prompt_logprob_start = {job.n_tokens} - 1 - {job.first_row})",
            field,
            rows,
        )
    if ids.shape[1] > limits.max_candidates:
        raise bad_request(
            f"{ids.shape[1]} ids per row exceed max_candidates={limits.max_candidates}",
            field,
            limits.max_candidates,
        )
    lo, hi = int(ids.min()), int(ids.max())
    if lo < -1 or hi >= vocab_size:
        raise bad_request(
            f"{field} holds ids outside [-1, {vocab_size}) (-1 pads a row): min {lo}, max {hi}",
            field,
            vocab_size,
        )


def build_request(jobs: list[PromptJob], temperature: float) -> tuple[PackedRequest, list[int]]:
    """One packed request for every job with something to score, and their indices.

    A request has one top_k and one candidate width: the largest asked for; each prompt's
    answer is trimmed back to its own in `slice_scores`.
    """
    scored = [i for i, j in enumerate(jobs) if j.n_rows > 0 or j.next_token]
    top_k = max((max(jobs[i].top_k, int(jobs[i].next_token)) for i in scored), default=0)
    width = max(
        (jobs[i].candidate_ids.shape[1] for i in scored if jobs[i].candidate_ids is not None),
        default=0,
    )
    seqs, score_from, cands = [], [], []
    for i in scored:
        job = jobs[i]
        tokens = job.token_ids
        if job.next_token:
            tokens = np.append(tokens, _PLACEHOLDER_ID)
        first = job.first_row if job.n_rows > 0 else job.n_tokens - 1
        seqs.append(tokens.astype(np.int32))
        score_from.append(first + 1)
        if width:
            block = np.zeros((len(tokens) - 1 - first, width), dtype=np.int32)
            if job.candidate_ids is not None:
                m = job.candidate_ids
                block[: m.shape[0], : m.shape[1]] = np.maximum(m, 0)
            cands.append(block)
    options = ScoreOptions(
        top_k=top_k,
        token_rank=any(jobs[i].ranks for i in scored),
        temperature=temperature,
    )
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    req = PackedRequest(
        token_ids_T=np.concatenate(seqs) if seqs else np.zeros(0, np.int32),
        seq_offsets_n1=offsets_from_lengths(lengths),
        score_from_n=np.array(score_from, dtype=np.int64),
        candidate_ids_NK=np.concatenate(cands) if width else None,
        options=options,
    )
    return req, scored


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
    service, jobs: list[PromptJob], temperature: float, field: str
) -> list[PromptScores]:
    """Score every job through the service's batcher; one PromptScores per job, in order.

    `service` is the app's ScoringService (typed loosely to keep this module free of its
    imports); `field` names the prompts in error messages.
    """
    assert service.info is not None
    check_jobs(jobs, service.limits, service.info.vocab_size, field)
    req, scored = build_request(jobs, temperature)
    out = [PromptScores.empty(j) for j in jobs]
    if not scored:
        return out
    try:
        validate_request(req, service.limits, service.info.vocab_size)
    except ContractError as exc:  # said in the route's terms: its option names, its prompts
        param = {"temperature": "temperature", "top_k": "prompt_logprobs"}.get(exc.field or "")
        raise bad_request(exc.message, param or field, exc.limit) from None
    result = await service.score_packed(req)
    service.metrics.scored_tokens.inc(int(result.scored_offsets_n1[-1]))
    service.metrics.input_tokens.inc(result.input_tokens)
    for seq, i in enumerate(scored):
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
