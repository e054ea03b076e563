"""POST /get_sequence_logprobs/: the scoring route of `trl vllm-serve` (TRL 1.1 to 1.10).

Older TRL installs score their teacher here instead of /v1/completions:

    {"sequences": [[ids], ...], "prompt_lengths": [p, ...], "top_logprobs": k,
     "temperature": T, "response_format": "json" | "binary"}

For every completion position pos = p .. L-1 of each sequence:
- JSON: `logprobs` and `logprob_token_ids`, [B][L - p][k or k + 1]: the teacher's top-k by rank,
  then the actual token when it is outside the top-k; a non-finite log-prob is null.
- binary (what TRL's client asks for by default, and the only form with the actual token's
  log-prob): `logprobs_b64` / `token_ids_b64` (float32 / int32 [B, max_len, k], padded with -inf
  and 0), `actual_logprobs_b64` / `actual_token_ids_b64` ([B, max_len, 1]), `shape`
  ([B, max_len, k]) and `completion_lengths`: raw little-endian arrays in base64, as TRL's
  `_decode_binary_logprobs` reads them (np.frombuffer, no pickle).
The temperature is applied, as TRL's server (vLLM with processed_logprobs) applies it.
"""

from __future__ import annotations

import base64
import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from opd.server.dropin.errors import Terms, bad_request
from opd.server.dropin.prompt_scores import Int64, PromptJob, PromptScores

# What the native request's sequences and top_k are called here.
TERMS = Terms(prompts="sequences", top_k="top_logprobs")


class SequenceLogprobsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sequences: list[list[Int64]]
    prompt_lengths: list[Int64]
    top_logprobs: Int64 = 100
    temperature: float = 1.0
    response_format: Literal["json", "binary"] = "json"


def jobs_for(req: SequenceLogprobsRequest) -> list[PromptJob]:
    if len(req.sequences) != len(req.prompt_lengths):
        raise bad_request(
            f"{len(req.sequences)} sequences but {len(req.prompt_lengths)} prompt_lengths",
            "prompt_lengths",
            len(req.sequences),
        )
    if req.top_logprobs < 1:
        raise bad_request("top_logprobs must be at least 1", "top_logprobs", 1)
    if req.temperature <= 0:
        raise bad_request("temperature must be positive", "temperature")
    jobs = []
    for i, (seq, plen) in enumerate(zip(req.sequences, req.prompt_lengths, strict=True)):
        if not 0 <= plen <= len(seq):
            raise bad_request(
                f"prompt_lengths[{i}]={plen} is outside [0, {len(seq)}] (the sequence length)",
                f"prompt_lengths[{i}]",
                len(seq),
            )
        first = max(plen - 1, 0)
        jobs.append(
            PromptJob(
                token_ids=np.asarray(seq, dtype=np.int64),
                first_row=first if first < len(seq) - 1 else None,
                top_k=req.top_logprobs,
            )
        )
    return jobs


def response(
    req: SequenceLogprobsRequest, jobs: list[PromptJob], scores: list[PromptScores]
) -> dict[str, Any]:
    if req.response_format == "binary":
        return binary(req, scores)
    return json_form(req, scores)


def _rows(req: SequenceLogprobsRequest, i: int, s: PromptScores) -> tuple[int, int]:
    """(completion length, leading empty positions): with prompt length 0 the first position
    has nothing before it and stays empty, as in TRL's server."""
    seq, plen = req.sequences[i], req.prompt_lengths[i]
    return len(seq) - plen, 1 if plen == 0 and len(seq) > 0 else 0


def json_form(req: SequenceLogprobsRequest, scores: list[PromptScores]) -> dict[str, Any]:
    all_lps, all_ids = [], []
    for i, s in enumerate(scores):
        seq = req.sequences[i]
        _, empty = _rows(req, i, s)
        lps_out: list[list[float | None]] = [[] for _ in range(empty)]
        ids_out: list[list[int]] = [[] for _ in range(empty)]
        tok = s.token_logprobs.tolist()
        top_ids = s.top_ids.tolist() if s.top_ids is not None else [[]] * len(tok)
        top_lps = s.top_logprobs.tolist() if s.top_logprobs is not None else [[]] * len(tok)
        offset = (s.first_row or 0) + 1
        for j, (ids, vals) in enumerate(zip(top_ids, top_lps, strict=True)):
            actual = seq[offset + j]
            ids, vals = list(ids), list(vals)
            if actual not in ids:
                ids.append(actual)
                vals.append(tok[j])
            lps_out.append([v if math.isfinite(v) else None for v in vals])
            ids_out.append(ids)
        all_lps.append(lps_out)
        all_ids.append(ids_out)
    return {"logprobs": all_lps, "logprob_token_ids": all_ids}


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def binary(req: SequenceLogprobsRequest, scores: list[PromptScores]) -> dict[str, Any]:
    k = req.top_logprobs
    lengths = [_rows(req, i, s)[0] for i, s in enumerate(scores)]
    width = max(lengths, default=0)
    n = len(scores)
    lps = np.full((n, width, k), -np.inf, dtype=np.float32)
    ids = np.zeros((n, width, k), dtype=np.int32)
    actual_lps = np.full((n, width, 1), -np.inf, dtype=np.float32)
    actual_ids = np.zeros((n, width, 1), dtype=np.int32)
    for i, s in enumerate(scores):
        seq = np.asarray(req.sequences[i], dtype=np.int32)
        _, empty = _rows(req, i, s)
        rows = len(s.token_logprobs)
        a, b = empty, empty + rows
        if s.top_ids is not None and s.top_logprobs is not None:
            lps[i, a:b] = s.top_logprobs
            ids[i, a:b] = s.top_ids
        actual_lps[i, a:b, 0] = s.token_logprobs
        offset = (s.first_row or 0) + 1
        actual_ids[i, a:b, 0] = seq[offset : offset + rows]
    return {
        "logprobs_b64": _b64(lps, "<f4"),
        "token_ids_b64": _b64(ids, "<i4"),
        "actual_logprobs_b64": _b64(actual_lps, "<f4"),
        "actual_token_ids_b64": _b64(actual_ids, "<i4"),
        "shape": [n, width, k],
        "completion_lengths": lengths,
    }
