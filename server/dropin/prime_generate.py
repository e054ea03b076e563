"""POST /inference/v1/generate: vLLM's token-in/token-out route, as prime-rl prefills a teacher.

    {"model", "token_ids": [ids], "sampling_params": {"max_tokens": 1, "temperature": 1.0,
     "top_p": 1.0, "prompt_logprobs": k, "prompt_logprob_token_ids": [[ids], ...],
     "prompt_logprob_start": s}}

answers vLLM's `GenerateTokensResponse` key for key: `choices` (the generated token ids) and a
top-level `prompt_logprobs` (vLLM's per-position dicts, actual token first, which prime-rl
reads), plus `prompt_token_id_logprobs`: vLLM's per-position candidate scores, base64 .npy
float32 [prompt_len - 1 - s, num_ids], row i = log-probs of its ids as predictions of prompt
token s + i + 1, -inf where the id is -1 padding. vLLM 0.32 serves those ids only with its V2
model runner (Triton: no CPU build has it); opd serves them on every backend.
`max_tokens` is 0 or 1, as on /v1/completions (opd.server.dropin.completions says why).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from opd.server.dropin.completions import (
    padded,
    prompt_job,
    refuse_bad_counts,
    top_k_field,
    usage,
)
from opd.server.dropin.errors import Terms, bad_request
from opd.server.dropin.prompt_scores import Int64, PromptJob, PromptScores
from opd.server.dropin.vllm_shapes import TokenTexts, clamp, npy_base64, prompt_logprobs


class SamplingParamsIn(BaseModel):
    """The SamplingParams fields opd reads; the others are accepted and ignored, as vLLM's
    defaults would leave a one-token prefill unchanged."""

    model_config = ConfigDict(extra="allow")

    max_tokens: Int64 | None = 16
    temperature: float = 1.0
    n: Int64 = 1
    prompt_logprobs: Int64 | None = None
    logprobs: Int64 | None = None
    prompt_logprob_token_ids: list[list[Int64]] | None = None
    prompt_logprob_start: Int64 | None = None


class TokensRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    request_id: str | None = None
    model: str | None = None
    token_ids: list[Int64] = Field(min_length=1)
    sampling_params: SamplingParamsIn = Field(default_factory=SamplingParamsIn)
    output_mode: Literal["tokens", "text"] = "tokens"
    stream: bool | None = False
    return_token_ids: bool | None = None


def refuse_unsupported(req: TokensRequest) -> None:
    sp = req.sampling_params
    if req.stream:
        raise bad_request("stream is not supported: the answer comes in one response", "stream")
    if req.output_mode != "tokens":
        raise bad_request('output_mode "text" is not supported; use "tokens"', "output_mode")
    if sp.n != 1:
        raise bad_request("sampling_params.n must be 1", "sampling_params.n", 1)
    refuse_bad_counts(sp, "sampling_params.")


_CANDIDATES = "sampling_params.prompt_logprob_token_ids"


def terms(req: TokensRequest) -> Terms:
    """The request's names for what the native request calls top_k, temperature, candidates."""
    top_k = top_k_field(req.sampling_params, "sampling_params.")
    return Terms("token_ids", top_k, "sampling_params.temperature", _CANDIDATES)


def job_for(req: TokensRequest) -> PromptJob:
    sp = req.sampling_params
    cands = None
    if sp.prompt_logprob_token_ids is not None:
        cands = padded(sp.prompt_logprob_token_ids, _CANDIDATES)
    return prompt_job(req.token_ids, cands, sp, _CANDIDATES)


def response(
    req: TokensRequest,
    model: str,
    job: PromptJob,
    scores: PromptScores,
    texts: TokenTexts,
    eos_id: int | None,
) -> dict[str, Any]:
    """vLLM's GenerateTokensResponse, key for key."""
    sp = req.sampling_params
    generated = [] if scores.next_token_id is None else [scores.next_token_id]
    token_id_logprobs = None
    if sp.prompt_logprob_token_ids is not None and scores.candidate_logprobs is not None:
        offset = (sp.prompt_logprob_start or 0) - (job.first_row or 0)
        token_id_logprobs = npy_base64(scores.candidate_logprobs[offset:].astype(np.float32))
    prompt_len = len(req.token_ids)
    choice = {
        "index": 0,
        "finish_reason": "stop" if generated and generated[0] == eos_id else "length",
        "stop_reason": None,
        "token_ids": generated,
        "routed_experts": None,
        "sampling_mask": None,
        "weight_versions": [{"version": "default", "start": 0, "end": len(generated)}]
        if generated
        else [],
        "logprobs": tokens_logprobs(scores, sp.logprobs) if sp.logprobs is not None else None,
    }
    return {
        "request_id": req.request_id or f"generate-tokens-{uuid.uuid4().hex[:16]}",
        "model": model,
        "created": int(time.time()),
        "usage": usage(prompt_len, len(generated)),
        "prompt_logprobs": prompt_logprobs(req.token_ids, scores, texts)
        if sp.prompt_logprobs is not None
        else None,
        "prompt_token_id_logprobs": token_id_logprobs,
        "prompt_token_ids": req.token_ids if req.return_token_ids else None,
        "mm_placeholders": None,
        "metrics": None,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "output_mode": "tokens",
        "choices": [choice],
    }


def tokens_logprobs(scores: PromptScores, k: int) -> dict[str, Any]:
    """vLLM's GenerateLogProbs of the generated token: integer ids, the token first."""
    if scores.next_top_ids is None or scores.next_top_logprobs is None:
        return {"content": []}
    ids = scores.next_top_ids.tolist()
    lps = [clamp(v) for v in scores.next_top_logprobs.tolist()]
    pairs = enumerate(zip(ids, lps, strict=True))
    top = [{"token_id": t, "logprob": v, "rank": r + 1} for r, (t, v) in pairs]
    return {
        "content": [
            {"token_id": ids[0], "logprob": lps[0], "rank": 1, "top_logprobs": top[: max(k, 0)]}
        ]
    }
