"""POST /generate in SGLang's native shape, as slime's on-policy distillation scores a sequence.

    {"input_ids": [ids] | [[ids], ...], "sampling_params": {"max_new_tokens": 0, "temperature",
     "skip_special_tokens"}, "return_logprob": true, "logprob_start_len": s,
     "top_logprobs_num": k, "token_ids_logprob": [ids], "token_ids_logprob_positions": [[ids]...]}

answers `{"text", "output_ids", "meta_info"}` per prompt (a JSON list for a batch), with
`meta_info.input_token_logprobs` as SGLang writes it: `L - s` triples `[logprob, token_id, text]`
for input tokens s .. L-1, the first one's logprob `null` (SGLang never scores the token at s),
`text` null unless `return_text_in_logprobs`. Per position, `input_top_logprobs` (with k) and
`input_token_ids_logprobs` are lists of such triples, `null` at the first entry.

`token_ids_logprob_positions` is SGLang PR #38119's per-position form (still open upstream):
exactly one id list per input token, row p holding the ids scored as predictions of input token
p (SGLang shifts by one itself, so row 0 is never used); answered in
`meta_info.input_token_ids_logprobs`, `null` where a row is empty. As in the PR it needs a single
prompt, `max_new_tokens: 0`, `return_logprob` and `logprob_start_len >= 0`.

`logprob_start_len` -1 (SGLang's default) asks for no input positions, as current SGLang
resolves it. `max_new_tokens` is 0 or 1 (1: the greedy next token, as on /v1/completions).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from opd.server.dropin.errors import Terms, bad_request
from opd.server.dropin.prompt_scores import Int64, PromptJob, PromptScores
from opd.server.dropin.vllm_shapes import TokenTexts, clamp


class GenerateReqInput(BaseModel):
    """The fields of SGLang's GenerateReqInput that opd reads; others are accepted and ignored.
    Per-prompt lists are accepted where SGLang accepts them; a scalar applies to every prompt."""

    model_config = ConfigDict(extra="allow")

    text: str | list[str] | None = None
    input_ids: list[Int64] | list[list[Int64]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: Int64 | list[Int64] | None = None
    top_logprobs_num: Int64 | list[Int64] | None = None
    token_ids_logprob: list[Int64] | list[list[Int64]] | None = None
    token_ids_logprob_positions: list[list[Int64]] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | list[str] | None = None


def prompt_ids(req: GenerateReqInput, tokenizer: Any) -> list[list[int]]:
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("give exactly one of text or input_ids", "input_ids")
    if req.stream:
        raise bad_request("stream is not supported: the answer comes in one response", "stream")
    if req.input_ids is not None:
        if not req.input_ids:
            raise bad_request("input_ids cannot be empty", "input_ids", 1)
        if isinstance(req.input_ids[0], int):
            return [list(req.input_ids)]  # type: ignore[arg-type]
        return [list(x) for x in req.input_ids]  # type: ignore[union-attr]
    texts = [req.text] if isinstance(req.text, str) else list(req.text or [])
    if tokenizer is None:
        raise bad_request("text prompts need the teacher's tokenizer", "text")
    return [tokenizer(t).input_ids for t in texts]


def is_batch(req: GenerateReqInput) -> bool:
    if req.input_ids is not None:
        return bool(req.input_ids) and not isinstance(req.input_ids[0], int)
    return isinstance(req.text, list)


def per_prompt(value: Any, n: int, default: Any, field: str) -> list[Any]:
    """A per-prompt option: a list of n values, or one value for every prompt."""
    if isinstance(value, list):
        if len(value) != n:
            raise bad_request(f"{field} holds {len(value)} values for {n} prompts", field, n)
        return [default if v is None else v for v in value]
    return [default if value is None else value] * n


def sampling(req: GenerateReqInput, n: int) -> list[dict[str, Any]]:
    """Per-prompt sampling params; their integers as strict as the request's own (a bool or a
    float is not a max_new_tokens)."""
    params = per_prompt(req.sampling_params, n, {}, "sampling_params")
    for p in params:
        new = p.get("max_new_tokens", 128)
        if type(new) is not int or not 0 <= new <= 1:
            raise bad_request(
                f"sampling_params.max_new_tokens={new!r}: this route scores prompts and "
                "generates at most one token; use POST /v1/generate for completions",
                "sampling_params.max_new_tokens",
                1,
            )
        n_samples = p.get("n", 1)
        if type(n_samples) is not int or n_samples != 1:
            raise bad_request("sampling_params.n must be 1", "sampling_params.n", 1)
    return params


def terms(req: GenerateReqInput) -> Terms:
    """The request's names for the parts of the native request it becomes."""
    positions = req.token_ids_logprob_positions is not None
    return Terms(
        prompts="input_ids" if req.input_ids is not None else "text",
        top_k="top_logprobs_num",
        temperature="sampling_params.temperature",
        candidates="token_ids_logprob_positions" if positions else "token_ids_logprob",
    )


def temperature(req: GenerateReqInput) -> float:
    """One temperature per request (the scoring options are per request); SGLang rewrites a
    temperature below 1e-6 to 1 (greedy via top_k = 1), which is what opd scores at too."""
    params = req.sampling_params
    values = set()
    for p in params if isinstance(params, list) else [params or {}]:
        t = p.get("temperature", 1.0)
        if isinstance(t, bool) or not isinstance(t, int | float):
            raise bad_request(
                f"sampling_params.temperature must be a number, not {t!r}",
                "sampling_params.temperature",
            )
        values.add(float(t))
    if len(values) > 1:
        raise bad_request(
            "all prompts of one request must share sampling_params.temperature",
            "sampling_params.temperature",
        )
    t = values.pop()
    return 1.0 if 0 <= t < 1e-6 else t


def jobs_for(req: GenerateReqInput, prompts: list[list[int]]) -> list[PromptJob]:
    n = len(prompts)
    params = sampling(req, n)
    want = per_prompt(req.return_logprob, n, False, "return_logprob")
    starts = per_prompt(req.logprob_start_len, n, -1, "logprob_start_len")
    ks = per_prompt(req.top_logprobs_num, n, 0, "top_logprobs_num")
    flat = flat_token_ids(req, n)
    positions = req.token_ids_logprob_positions
    if positions is not None:
        check_positions(req, prompts, params, want, starts)
    jobs = []
    for i, ids in enumerate(prompts):
        start = starts[i]
        if start < -1 or start > len(ids):
            raise bad_request(
                f"logprob_start_len={start} is outside [-1, {len(ids)}] (the input length)",
                "logprob_start_len",
                len(ids),
            )
        first = start if want[i] and 0 <= start < len(ids) - 1 else None
        cands = None
        if first is not None and flat[i] is not None:
            cands = np.tile(np.asarray(flat[i], dtype=np.int64), (len(ids) - 1 - first, 1))
        if first is not None and positions is not None:
            cands = position_matrix(positions[first + 1 :])
        if ks[i] < 0:
            raise bad_request("top_logprobs_num must be non-negative", "top_logprobs_num")
        next_token = params[i].get("max_new_tokens", 128) == 1
        if next_token and flat[i] is not None and want[i]:
            raise bad_request(
                "token_ids_logprob with max_new_tokens 1 is not served: send max_new_tokens 0",
                "token_ids_logprob",
            )
        jobs.append(
            PromptJob(
                token_ids=np.asarray(ids, dtype=np.int64),
                first_row=first,
                top_k=ks[i] if want[i] else 0,
                candidate_ids=cands,
                next_token=next_token,
            )
        )
    return jobs


def flat_token_ids(req: GenerateReqInput, n: int) -> list[list[int] | None]:
    ids = req.token_ids_logprob
    if not ids:
        return [None] * n
    if isinstance(ids[0], list):
        if len(ids) != n:
            raise bad_request(
                f"token_ids_logprob holds {len(ids)} lists for {n} prompts", "token_ids_logprob", n
            )
        return [list(x) or None for x in ids]  # type: ignore[union-attr]
    return [list(ids)] * n  # type: ignore[arg-type]


def check_positions(
    req: GenerateReqInput,
    prompts: list[list[int]],
    params: list[dict[str, Any]],
    want: list[bool],
    starts: list[int],
) -> None:
    """SGLang PR #38119's rules for token_ids_logprob_positions."""
    field = "token_ids_logprob_positions"
    if len(prompts) != 1 or is_batch(req):
        raise bad_request("per-position scoring accepts one input sequence per request", field)
    if req.token_ids_logprob:
        raise bad_request(
            "token_ids_logprob and token_ids_logprob_positions are mutually exclusive", field
        )
    positions = req.token_ids_logprob_positions or []
    if len(positions) != len(prompts[0]):
        raise bad_request(
            f"{field} holds {len(positions)} rows; it needs one per input token "
            f"({len(prompts[0])})",
            field,
            len(prompts[0]),
        )
    if not want[0] or params[0].get("max_new_tokens", 128) != 0 or starts[0] < 0:
        raise bad_request(
            "per-position scoring requires return_logprob, max_new_tokens 0 and a "
            "non-negative logprob_start_len",
            field,
        )
    for p, row in enumerate(positions):
        if len(set(row)) != len(row):
            raise bad_request(f"{field}[{p}] repeats an id; ids must be unique per row", field)


def position_matrix(rows: list[list[int]]) -> np.ndarray | None:
    """Ragged id rows as a matrix padded with -1 (scored -inf, answered as absent)."""
    width = max((len(r) for r in rows), default=0)
    if width == 0:
        return None
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def response(
    req: GenerateReqInput,
    prompts: list[list[int]],
    jobs: list[PromptJob],
    scores: list[PromptScores],
    texts: TokenTexts,
    eos_id: int | None,
) -> dict[str, Any] | list[dict[str, Any]]:
    """SGLang's answer: one object per prompt; a JSON list for a batch request."""
    started = time.perf_counter()
    params = sampling(req, len(prompts))
    want = per_prompt(req.return_logprob, len(prompts), False, "return_logprob")
    starts = per_prompt(req.logprob_start_len, len(prompts), -1, "logprob_start_len")
    rid = req.rid
    items = []
    for i, (ids, job, s) in enumerate(zip(prompts, jobs, scores, strict=True)):
        triple = Triples(texts if req.return_text_in_logprobs else None)
        generated = [] if s.next_token_id is None else [s.next_token_id]
        finish: dict[str, Any] = {"type": "length", "length": len(generated)}
        if generated and generated[0] == eos_id:
            finish = {"type": "stop", "matched": eos_id}
        meta: dict[str, Any] = {
            "id": (
                rid[i]
                if isinstance(rid, list)
                else f"{rid}_{i}"
                if rid and len(prompts) > 1
                else rid
            )
            or uuid.uuid4().hex,
            "finish_reason": finish,
            "prompt_tokens": len(ids),
            "weight_version": "default",
        }
        if want[i]:
            start = starts[i] if starts[i] >= 0 else len(ids)
            meta.update(logprob_block(ids, start, job, s, triple, req))
        meta["completion_tokens"] = len(generated)
        meta["cached_tokens"] = 0
        meta["e2e_latency"] = time.perf_counter() - started
        skip = params[i].get("skip_special_tokens", True)
        text = texts.decode(generated) if skip else "".join(texts[t] or "" for t in generated)
        items.append({"text": text, "output_ids": generated, "meta_info": meta})
    return items if is_batch(req) else items[0]


class Triples:
    """SGLang's `[logprob, token_id, text]` items; text only with return_text_in_logprobs."""

    def __init__(self, texts: TokenTexts | None) -> None:
        self.texts = texts

    def __call__(self, logprob: float | None, token_id: int) -> list[Any]:
        text = self.texts[token_id] if self.texts is not None else None
        return [None if logprob is None else clamp(logprob), token_id, text]

    def row(self, ids: list[int], logprobs: list[float]) -> list[list[Any]] | None:
        items = [self(lp, t) for t, lp in zip(ids, logprobs, strict=True) if t >= 0]
        return items or None


def logprob_block(
    ids: list[int],
    start: int,
    job: PromptJob,
    s: PromptScores,
    triple: Triples,
    req: GenerateReqInput,
) -> dict[str, Any]:
    """meta_info's logprob fields for input tokens start .. L-1, SGLang's order of keys."""
    lps = s.token_logprobs.tolist()
    block: dict[str, Any] = {
        "input_token_logprobs": [triple(None, ids[start])] if start < len(ids) else [],
    }
    block["input_token_logprobs"] += [triple(lp, ids[start + 1 + j]) for j, lp in enumerate(lps)]
    gen_ids = s.next_top_ids.tolist() if s.next_top_ids is not None else []
    gen_lps = s.next_top_logprobs.tolist() if s.next_top_logprobs is not None else []
    block["output_token_logprobs"] = [triple(gen_lps[0], gen_ids[0])] if gen_ids else []
    if job.top_k:
        head = [None] if start < len(ids) else []
        top_ids = s.top_ids.tolist() if s.top_ids is not None else []
        top_lps = s.top_logprobs.tolist() if s.top_logprobs is not None else []
        block["input_top_logprobs"] = head + [
            triple.row(t, v) for t, v in zip(top_ids, top_lps, strict=True)
        ]
        block["output_top_logprobs"] = (
            [triple.row(gen_ids[: job.top_k], gen_lps[: job.top_k])] if gen_ids else []
        )
    if req.token_ids_logprob or req.token_ids_logprob_positions is not None:
        head = [None] if start < len(ids) else []
        rows: list[Any] = []
        if job.candidate_ids is not None and s.candidate_logprobs is not None:
            rows = [
                triple.row(c, v)
                for c, v in zip(
                    job.candidate_ids.tolist(), s.candidate_logprobs.tolist(), strict=True
                )
            ]
        else:
            rows = [None] * len(lps)
        block["input_token_ids_logprobs"] = head + rows
        block["output_token_ids_logprobs"] = []
    return block
