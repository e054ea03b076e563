"""POST /v1/completions (vLLM's scoring shape) against real `opd serve` processes.

The numbers must be the ones POST /v1/score gives on the same server (one scoring path), the
shape must be vLLM's (k or k + 1 entries per position, actual token first, integer ranks), the
OpenAI SDK must parse it, and every bad input must get an OpenAI error with a 4xx while the
server keeps serving.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from opd.client import TeacherClient
from opd.shared.packed import PackedRequest
from opd.shared.schemas import ScoreOptions
from tests.support.keys import TEST_API_KEY

PROMPTS = [[5, 17, 250, 31, 9, 77, 120, 4], [300, 2, 2, 41, 8]]
# Same scoring path, but not the same pack (the route adds the next-token row): the matmul's
# float32 rounding differs by a few ulps of the value.
TOL = {"atol": 1e-5, "rtol": 1e-5}
TOL_APPROX = {"abs": 1e-5, "rel": 1e-5}


def served_name(url: str, headers: dict | None = None) -> str:
    return httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]


def score_reference(url: str, prompts, k: int, temperature: float):
    """The same positions through POST /v1/score: token log-probs and ranks, top-k."""
    with TeacherClient(url) as client:
        options = ScoreOptions(top_k=k, token_rank=True, temperature=temperature)
        req = PackedRequest.from_arrays(prompts, [1] * len(prompts), options=options)
        return client.score(req).sequences()


def completions(url: str, **body):
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_prompt_logprobs_equal_v1_score_in_vllms_shape(tiny_server, temperature):
    k = 4
    r = completions(
        tiny_server,
        model=served_name(tiny_server),
        prompt=PROMPTS,
        max_tokens=1,
        temperature=temperature,
        prompt_logprobs=k,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    refs = score_reference(tiny_server, PROMPTS, k, temperature)
    for prompt, choice, ref in zip(PROMPTS, body["choices"], refs, strict=True):
        plp = choice["prompt_logprobs"]
        assert len(plp) == len(prompt) and plp[0] is None
        for p in range(1, len(prompt)):
            entries = plp[p]
            keys = list(entries)
            assert keys[0] == str(prompt[p])  # the actual token first
            assert len(entries) in (k, k + 1) and len(set(keys)) == len(keys)
            actual = entries[keys[0]]
            assert isinstance(actual["rank"], int)
            assert actual["logprob"] == pytest.approx(ref.token_logprobs[p - 1], **TOL_APPROX)
            assert actual["rank"] == ref.token_ranks[p - 1]
            top = sorted(entries.items(), key=lambda kv: kv[1]["rank"])[:k]
            assert [int(t) for t, _ in top] == ref.top_k_ids[p - 1].tolist()
            np.testing.assert_allclose(
                [v["logprob"] for _, v in top], ref.top_k_logprobs[p - 1], **TOL
            )
            assert [v["rank"] for _, v in top] == list(range(1, k + 1))
            assert all(isinstance(v["decoded_token"], str) for v in entries.values())
        # max_tokens 1: the greedy next token, from the same pass
        assert choice["finish_reason"] in ("length", "stop") and isinstance(choice["text"], str)
    usage = body["usage"]
    assert usage["prompt_tokens"] == sum(map(len, PROMPTS)) and usage["completion_tokens"] == 2


def test_actual_token_in_top_k_appears_once_with_its_top_k_rank(tiny_server):
    """A prompt built from the teacher's own greedy choices: every actual token is rank 1, so
    every position holds exactly k entries and the first has rank 1."""
    prompt = [5]
    for _ in range(6):
        r = completions(tiny_server, prompt=prompt, max_tokens=1, return_token_ids=True)
        prompt.append(r.json()["choices"][0]["token_ids"][0])
    body = completions(tiny_server, prompt=prompt, max_tokens=0, prompt_logprobs=3).json()
    (choice,) = body["choices"]
    assert choice["text"] == "" and body["usage"]["completion_tokens"] == 0
    for p in range(1, len(prompt)):
        entries = choice["prompt_logprobs"][p]
        assert len(entries) == 3 and list(entries)[0] == str(prompt[p])
        assert entries[str(prompt[p])]["rank"] == 1


def test_prompt_logprobs_zero_gives_the_actual_token_and_its_rank(tiny_server):
    body = completions(tiny_server, prompt=PROMPTS[0], max_tokens=1, prompt_logprobs=0).json()
    (ref,) = score_reference(tiny_server, [PROMPTS[0]], 0, 1.0)
    plp = body["choices"][0]["prompt_logprobs"]
    for p in range(1, len(PROMPTS[0])):
        ((tid, entry),) = plp[p].items()
        assert tid == str(PROMPTS[0][p]) and entry["rank"] == ref.token_ranks[p - 1]


def test_one_token_prompt_and_text_prompts(tiny_server):
    body = completions(tiny_server, prompt=[7], max_tokens=1, prompt_logprobs=2).json()
    assert body["choices"][0]["prompt_logprobs"] == [None]
    assert body["usage"] == {
        "prompt_tokens": 1,
        "total_tokens": 2,
        "completion_tokens": 1,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    text = completions(tiny_server, prompt=["The sky is", "Hi"], max_tokens=1, prompt_logprobs=1)
    assert text.status_code == 200 and len(text.json()["choices"]) == 2


def test_logprobs_of_the_generated_token(tiny_server):
    body = completions(tiny_server, prompt=PROMPTS[1], max_tokens=1, logprobs=3).json()
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["text_offset"] == [0] and len(logprobs["tokens"]) == 1
    values = list(logprobs["top_logprobs"][0].values())
    assert values == sorted(values, reverse=True) and len(values) <= 3
    assert logprobs["token_logprobs"][0] == pytest.approx(values[0])


def test_the_openai_sdk_parses_the_answer(tiny_server):
    """prime-rl and many scripts call the teacher with the OpenAI SDK (installed package)."""
    from openai import OpenAI

    client = OpenAI(base_url=tiny_server + "/v1", api_key="unused", max_retries=0)
    (model,) = [m.id for m in client.models.list().data]
    out = client.completions.create(
        model=model,
        prompt=PROMPTS,
        max_tokens=1,
        temperature=1.0,
        extra_body={"prompt_logprobs": 2},
    )
    assert len(out.choices) == 2 and out.usage.prompt_tokens == sum(map(len, PROMPTS))
    plp = out.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(PROMPTS[0])
    refs = score_reference(tiny_server, PROMPTS, 2, 1.0)
    got = [plp[p][str(PROMPTS[0][p])]["logprob"] for p in range(1, len(PROMPTS[0]))]
    np.testing.assert_allclose(got, refs[0].token_logprobs, **TOL)


def _openai_error(r: httpx.Response, status: int, param: str | None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert list(err) == ["message", "type", "param", "code"] and err["code"] == status
    assert err["param"] == param
    return err["message"]


@pytest.mark.parametrize(
    ("body", "status", "param", "says"),
    [
        ({"model": "other-model"}, 404, "model", "other-model"),
        ({"prompt_logprobs": 9}, 400, "prompt_logprobs", "max_top_k=8"),
        ({"prompt_logprobs": -1}, 400, "prompt_logprobs", "whole vocabulary"),
        ({"max_tokens": 5}, 400, "max_tokens", "/v1/generate"),
        ({"max_tokens": None}, 400, "max_tokens", "/v1/generate"),
        ({"stream": True}, 400, "stream", "stream"),
        ({"n": 2}, 400, "n", "n and best_of"),
        ({"echo": True}, 400, "echo", "echo"),
        ({"prompt": [[1, 2], [3, 99999]]}, 400, "prompt[1]", "outside the vocabulary"),
        ({"prompt": [[1] * 129]}, 400, "prompt", "max_tokens_per_sequence=128"),
        ({"prompt": [[1, 2]] * 5}, 400, "prompt", "max_sequences=4"),
        ({"prompt": [[1] * 100, [1] * 100, [1] * 100]}, 400, "prompt", "max_total_tokens=256"),
        ({"prompt": "x", "temperature": 500.0}, 400, "temperature", "temperature"),
        ({"prompt": [1, "a"]}, 400, "prompt[1]", ""),
        ({"prompt_logprob_start": 1}, 400, "prompt_logprob_start", "requires"),
        ({"prompt_logprob_token_ids": [[1, 2]]}, 400, "prompt_logprob_token_ids", "rows"),
        ({"prompt_logprob_token_ids": [[1, 99999]] * 3}, 400, "prompt_logprob_token_ids", ""),
        ({"prompt_logprob_token_ids": [[1] * 9] * 3}, 400, "prompt_logprob_token_ids", "=8"),
    ],
)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(
    strict_server, body, status, param, says
):
    auth = {"Authorization": f"Bearer {TEST_API_KEY}"}
    full = {"model": "strict-teacher", "prompt": [4, 5, 6, 7], "max_tokens": 1, **body}
    r = httpx.post(strict_server + "/v1/completions", json=full, headers=auth, timeout=60)
    message = _openai_error(r, status, param)
    assert says in message
    ok = {"model": "strict-teacher", "prompt": [4, 5, 6, 7], "max_tokens": 1}
    assert httpx.post(strict_server + "/v1/completions", json=ok, headers=auth).status_code == 200


def test_auth_malformed_json_and_unknown_fields(strict_server):
    url = strict_server + "/v1/completions"
    body = {"model": "strict-teacher", "prompt": [4, 5, 6], "max_tokens": 1}
    _openai_error(httpx.post(url, json=body), 401, "Authorization")
    auth = {"Authorization": f"Bearer {TEST_API_KEY}", "Content-Type": "application/json"}
    _openai_error(httpx.post(url, content=b"{nope", headers=auth), 400, "body")
    # Unknown OpenAI fields are accepted and ignored, as vLLM does.
    extra = {**body, "user": "me", "seed": 3, "top_p": 0.9, "stop": ["\n"], "frequency_penalty": 0}
    assert httpx.post(url, json=extra, headers=auth).status_code == 200
