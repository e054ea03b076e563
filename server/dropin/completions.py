"""POST /v1/completions in the OpenAI/vLLM shape, as TRL's clients and the OpenAI SDK send it.

    {"model": NAME, "prompt": [ids] | [[ids], ...] | "text" | ["text", ...],
     "max_tokens": 0 | 1, "temperature": T, "prompt_logprobs": k, "logprobs": k2,
     "prompt_logprob_token_ids": [[ids], ...], "prompt_logprob_start": s}

answers vLLM's `CompletionResponse`, key for key: one choice per prompt, in order, each with
`prompt_logprobs` as vLLM serialises it (opd.server.dropin.vllm_shapes). Where opd differs from
vLLM 0.32, on purpose (docs/integrations.md):
- `temperature` is applied to the prompt log-probs (log-softmax of logits / T), which is what
  TRL's clients ask for; vLLM ignores it there. `temperature: 0` (greedy) scores at T = 1, as
  vLLM's numbers are.
- `max_tokens: 1` returns the teacher's greedy next token (from the same forward pass, not
  sampled) with finish_reason "length" ("stop" when it is the EOS); `max_tokens: 0` (refused by
  vLLM) returns an empty completion; more is refused with a 400 pointing to POST /v1/generate,
  since this route is a scoring route.
- `prompt_logprob_token_ids` / `prompt_logprob_start` (vLLM's SamplingParams fields, which its
  completions route does not serve) are honoured: each choice then carries
  `prompt_token_id_logprobs`, base64 .npy float32 [rows, ids].
Unknown OpenAI fields are accepted and ignored, as vLLM does; fields that would change the
answer in a way opd does not implement (stream, n > 1, echo, best_of, logit_bias, suffix) are
refused with a 400 naming the field, never silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from opd.server.dropin.errors import Terms, bad_request
from opd.server.dropin.prompt_scores import Int64, PromptJob, PromptScores
from opd.server.dropin.vllm_shapes import (
    TokenTexts,
    completion_logprobs,
    npy_base64,
    prompt_logprobs,
)

PromptIds = list[Int64]


class CompletionRequest(BaseModel):
    """The fields of vLLM's CompletionRequest that opd reads; others are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: PromptIds | list[PromptIds] | str | list[str]
    max_tokens: Int64 | None = Field(default=16, description="0 or 1 here (OpenAI default 16)")
    temperature: float | None = None
    prompt_logprobs: Int64 | None = None
    logprobs: Int64 | None = None
    n: Int64 = 1
    best_of: Int64 | None = None
    echo: bool = False
    stream: bool = False
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    return_token_ids: bool = False
    prompt_logprob_token_ids: list[list[Int64]] | list[list[list[Int64]]] | None = None
    prompt_logprob_start: Int64 | None = None


def refuse_unsupported(req: CompletionRequest) -> None:
    """Fields that would change the answer in ways this scoring route does not implement."""
    if req.stream:
        raise bad_request("stream is not supported: the answer comes in one response", "stream")
    if req.n != 1 or (req.best_of or 1) != 1:
        raise bad_request("n and best_of must be 1: use POST /v1/generate for samples", "n", 1)
    if req.echo:
        raise bad_request("echo is not supported; prompt_logprobs covers the prompt", "echo")
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")
    refuse_bad_counts(req, "")


def refuse_bad_counts(fields: Any, prefix: str) -> None:
    """max_tokens 0 or 1 and vLLM's rules for the log-prob counts and the candidate start,
    shared with the token-in/token-out route (`fields` is its sampling_params there, `prefix`
    its path)."""
    if fields.max_tokens is None or not 0 <= fields.max_tokens <= 1:
        raise bad_request(
            f"{prefix}max_tokens={fields.max_tokens}: this route scores prompts and generates at "
            "most one token (send max_tokens 0 or 1); use POST /v1/generate for completions",
            f"{prefix}max_tokens",
            1,
        )
    for name in ("prompt_logprobs", "logprobs"):
        value = getattr(fields, name)
        if value is not None and value < 0:
            which = "the whole vocabulary" if value == -1 else "a negative count"
            raise bad_request(
                f"{prefix}{name}={value} ({which}) is not served; ask for at most max_top_k",
                f"{prefix}{name}",
            )
    start = fields.prompt_logprob_start
    if start is not None:
        if fields.prompt_logprob_token_ids is None:
            raise bad_request(
                "prompt_logprob_start requires prompt_logprob_token_ids",
                f"{prefix}prompt_logprob_start",
            )
        if start < 0:
            raise bad_request(
                "prompt_logprob_start must be non-negative", f"{prefix}prompt_logprob_start"
            )


def terms(req: CompletionRequest) -> Terms:
    """The request's names for what the native request calls top_k and the sequences."""
    return Terms(prompts="prompt", top_k=top_k_field(req, ""))


def top_k_field(fields: Any, prefix: str) -> str:
    """Which of the counts became the native top_k: logprobs (the next token's) where it asks
    for more than prompt_logprobs, else prompt_logprobs (`fields`, `prefix`: as for
    refuse_bad_counts)."""
    if fields.max_tokens == 1 and (fields.logprobs or 0) > (fields.prompt_logprobs or 0):
        return f"{prefix}logprobs"
    return f"{prefix}prompt_logprobs"


def prompt_ids(req: CompletionRequest, tokenizer: Any) -> list[list[int]]:
    """The prompts as token ids (text prompts tokenized as vLLM does, special tokens added)."""
    p = req.prompt
    if isinstance(p, str):
        p = [p]
    if not p:
        raise bad_request("prompt must not be empty", "prompt")
    if isinstance(p[0], int):
        return [list(p)]  # type: ignore[arg-type]
    if isinstance(p[0], str):
        if tokenizer is None:
            raise bad_request("text prompts need the teacher's tokenizer", "prompt")
        return [tokenizer(text).input_ids for text in p]  # type: ignore[union-attr]
    return [list(x) for x in p]  # type: ignore[union-attr]


def candidate_matrices(req: CompletionRequest, n_prompts: int) -> list[np.ndarray | None]:
    """prompt_logprob_token_ids per prompt: a 2-D matrix applies to every prompt (vLLM's
    SamplingParams are per request), a list of matrices gives one per prompt."""
    ids = req.prompt_logprob_token_ids
    if ids is None:
        return [None] * n_prompts
    field = "prompt_logprob_token_ids"
    if ids and ids[0] and isinstance(ids[0][0], list):
        if len(ids) != n_prompts:
            raise bad_request(
                f"{field} holds {len(ids)} matrices for {n_prompts} prompts", field, n_prompts
            )
        return [padded(m, field) for m in ids]  # type: ignore[arg-type]
    matrix = padded(ids, field)  # type: ignore[arg-type]
    return [matrix] * n_prompts


def padded(rows: list[list[int]], field: str) -> np.ndarray:
    """Ragged rows padded with -1 (scored as -inf), as vLLM pads them."""
    width = max((len(r) for r in rows), default=0)
    if not rows or width == 0:
        raise bad_request(f"{field} must be a non-empty integer matrix [num_rows, num_ids]", field)
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def jobs_for(req: CompletionRequest, prompts: list[list[int]]) -> list[PromptJob]:
    """One PromptJob per prompt."""
    matrices = candidate_matrices(req, len(prompts))
    return [
        prompt_job(ids, cands, req, "prompt_logprob_token_ids")
        for ids, cands in zip(prompts, matrices, strict=True)
    ]


def prompt_job(ids: list[int], cands: np.ndarray | None, fields: Any, field: str) -> PromptJob:
    """The PromptJob of one prompt, by vLLM's sampling fields (`fields`: the request, or its
    sampling_params; `field`: the candidates' path). With prompt_logprobs the rows start at 0,
    so candidate rows that start at prompt_logprob_start are padded above to line up with them."""
    k = fields.prompt_logprobs
    start = fields.prompt_logprob_start or 0
    next_token = fields.max_tokens == 1
    first = 0 if k is not None else (start if cands is not None else None)
    if cands is not None:
        cands = lined_up(cands, len(ids), start, first or 0, field)
    return PromptJob(
        token_ids=np.asarray(ids, dtype=np.int64),
        first_row=first,
        top_k=max(k or 0, (fields.logprobs or 0) if next_token else 0),
        ranks=k is not None,
        candidate_ids=cands,
        next_token=next_token,
    )


def lined_up(cands: np.ndarray, prompt_len: int, start: int, first: int, field: str) -> np.ndarray:
    """Candidate rows (exactly prompt_len - 1 - start of them, vLLM's rule) placed from row
    `start` of a job whose rows begin at `first` <= start; rows above are padding (-1)."""
    rows = max(prompt_len - 1 - start, 0)
    if cands.shape[0] != rows:
        raise bad_request(
            f"{field} has {cands.shape[0]} rows, but the prompt has {rows} "
            f"scored rows (prompt_len - 1 - prompt_logprob_start = {prompt_len} - 1 - {start})",
            field,
            rows,
        )
    if first == start:
        return cands
    out = np.full((rows + start - first, cands.shape[1]), -1, dtype=np.int64)
    out[start - first :] = cands
    return out


def response(
    req: CompletionRequest,
    model: str,
    prompts: list[list[int]],
    jobs: list[PromptJob],
    scores: list[PromptScores],
    texts: TokenTexts,
    eos_id: int | None,
    fingerprint: str,
) -> dict[str, Any]:
    """vLLM's CompletionResponse, key for key."""
    start = req.prompt_logprob_start or 0
    choices = []
    completion_tokens = 0
    for i, (ids, job, s) in enumerate(zip(prompts, jobs, scores, strict=True)):
        generated: list[int] = [] if s.next_token_id is None else [s.next_token_id]
        completion_tokens += len(generated)
        finish = "stop" if generated and generated[0] == eos_id else "length"
        choice: dict[str, Any] = {
            "index": i,
            "text": texts.decode(generated),
            "logprobs": completion_logprobs(s, req.logprobs, texts)
            if req.logprobs is not None and generated
            else None,
            "finish_reason": finish,
            "stop_reason": None,
            "token_ids": generated if req.return_token_ids else None,
            "prompt_logprobs": prompt_logprobs(ids, s, texts)
            if req.prompt_logprobs is not None
            else None,
            "prompt_token_ids": ids if req.return_token_ids else None,
            "routed_experts": None,
        }
        if req.prompt_logprob_token_ids is not None:
            cand = s.candidate_logprobs
            if cand is None:
                cand = np.zeros((0, 0), np.float32)
            offset = start - (job.first_row or 0)
            choice["prompt_token_id_logprobs"] = npy_base64(cand[offset:].astype(np.float32))
        choices.append(choice)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:16]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": fingerprint,
        "usage": usage(prompt_tokens, completion_tokens),
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
