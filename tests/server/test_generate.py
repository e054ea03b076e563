"""POST /v1/generate on the HF backend: sampling options, seeding, limits, errors, client split.

Real `opd serve` processes over real HTTP. Greedy decoding of the real SmolLM2 is checked
against an independent float64 argmax loop over the model's own logits.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from opd.client import TeacherClient
from opd.shared.schemas import GenerateRequest
from opd.shared.version import MSGPACK_MEDIA_TYPE
from tests.support.keys import TEST_API_KEY

AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
EOS = 2  # <|im_end|> in SmolLM2's tokenizer


def _post(url: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/generate", json=body, headers=headers or {}, timeout=120)


def test_sampling_options_seed_and_shapes(tiny_server):
    body = {"prompts": ["Hello there", "What is 2+2?"], "max_tokens": 12, "n": 3, "seed": 7}
    first = _post(tiny_server, body)
    assert first.status_code == 200, first.text
    answer = first.json()
    assert len(answer["results"]) == 2
    for result in answer["results"]:
        assert result["prompt_token_ids"][-3:] != []
        assert len(result["completions"]) == 3
        for c in result["completions"]:
            ids = c["token_ids"]
            assert 1 <= len(ids) <= 12
            # EOS only ever as the last token, and then the reason is "stop"
            assert EOS not in ids[:-1]
            assert c["finish_reason"] == ("stop" if ids[-1] == EOS else "length")
            assert isinstance(c["text"], str)
    usage = answer["usage"]
    assert usage["prompts"] == 2
    assert usage["completion_tokens"] == sum(
        len(c["token_ids"]) for r in answer["results"] for c in r["completions"]
    )
    # the same seed gives the same completions; another seed gives others
    assert _post(tiny_server, body).json()["results"] == answer["results"]
    other = _post(tiny_server, {**body, "seed": 8}).json()["results"]
    assert other != answer["results"]
    # prompt i samples with seed + i: prompt 1 alone with seed 8 equals prompt 1 above
    alone = _post(tiny_server, {**body, "prompts": body["prompts"][1:], "seed": 8}).json()
    assert alone["results"][0] == answer["results"][1]


def test_greedy_and_token_id_prompts(tiny_server):
    ids = [1, 504, 3458, 30]
    greedy = {"prompt_token_ids": [ids], "max_tokens": 8, "temperature": 0, "n": 2}
    r = _post(tiny_server, greedy)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert result["prompt_token_ids"] == ids
    a, b = result["completions"]
    assert a == b  # greedy: n identical completions
    assert _post(tiny_server, greedy).json()["results"][0] == result


def test_greedy_matches_float64_argmax_of_the_real_model(smol_server, smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.shared.chat import chat_prompt_ids

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = "What is the capital of France?"
    r = _post(smol_server, {"prompts": [prompt], "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    ids = chat_prompt_ids(tok, prompt)
    assert result["prompt_token_ids"] == ids
    served = result["completions"][0]["token_ids"]

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float64).eval()
    seq = list(ids)
    expected = []
    with torch.no_grad():
        for _ in range(len(served)):
            logits = model(torch.tensor([seq])).logits[0, -1]
            nxt = int(torch.argmax(logits))
            expected.append(nxt)
            seq.append(nxt)
            if nxt == tok.eos_token_id:
                break
    assert served == expected
    assert result["completions"][0]["text"] == tok.decode(served, skip_special_tokens=True)
    assert "Paris" in result["completions"][0]["text"]


ERRORS = [
    ({"prompts": ["a"], "prompt_token_ids": [[1, 2]]}, 422, "prompts", None),
    ({"max_tokens": 4}, 422, "prompts", None),
    ({"prompts": []}, 422, "prompts", None),
    ({"prompts": ["a"], "n": 9}, 422, "n", 8),
    ({"prompts": ["a"], "max_tokens": 100}, 422, "max_tokens", 64),
    ({"prompt_token_ids": [[1] * 100], "max_tokens": 64}, 422, "prompt_token_ids[0]", 128),
    ({"prompt_token_ids": [[1, 49152]], "max_tokens": 4}, 422, "prompt_token_ids[0]", 49152),
    ({"prompt_token_ids": [[]], "max_tokens": 4}, 422, "prompt_token_ids[0]", 1),
    ({"prompts": ["a"] * 5, "max_tokens": 4}, 422, "prompts", 4),
    ({"prompts": ["a"], "temperature": -1}, 422, "temperature", None),
    ({"prompts": ["a"], "top_p": 0}, 422, "top_p", None),
    ({"prompts": ["a"], "top_p": 1.5}, 422, "top_p", None),
    ({"prompts": ["a"], "max_token": 4}, 422, "max_token", None),
    ({"prompts": ["a"], "seed": -1}, 422, "seed", None),
]


@pytest.mark.parametrize(("body", "status", "field", "limit"), ERRORS)
def test_bad_generate_requests_name_the_field(strict_server, body, status, field, limit):
    r = _post(strict_server, body, AUTH)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field, err
    if limit is not None:
        assert err["limit"] == limit, err
    assert err["request_id"] == r.headers["x-request-id"]
    ok = _post(strict_server, {"prompts": ["hi"], "max_tokens": 2}, AUTH)
    assert ok.status_code == 200, ok.text


def test_generate_auth_encoding_and_malformed_body(strict_server):
    assert _post(strict_server, {"prompts": ["hi"], "max_tokens": 2}).status_code == 401
    r = httpx.post(
        strict_server + "/v1/generate",
        content=b"\x81\xa1a\x01",
        headers={**AUTH, "Content-Type": MSGPACK_MEDIA_TYPE},
    )
    assert r.status_code == 415 and r.json()["error"]["field"] == "Content-Type"
    r = httpx.post(
        strict_server + "/v1/generate",
        content=b"{not json",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "malformed_body"
    big = {"prompts": ["x" * 5000], "max_tokens": 2}
    r = _post(strict_server, big, AUTH)
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"
    limits = httpx.get(strict_server + "/v1/model", headers=AUTH).json()["limits"]
    assert limits["max_generate_n"] == 8 and limits["max_generate_tokens"] == 64


def test_client_splits_under_the_limits_and_keeps_seeds(strict_server):
    prompts = [f"Count to {i}" for i in range(6)]  # 6 prompts, the server takes 4 per request
    with TeacherClient(strict_server, api_key=TEST_API_KEY) as teacher:
        whole = teacher.generate(GenerateRequest(prompts=prompts, max_tokens=6, seed=3))
        assert [r.prompt_token_ids for r in whole.results] == [
            teacher.generate(GenerateRequest(prompts=[p], max_tokens=1)).results[0].prompt_token_ids
            for p in prompts
        ]
        # prompt 5 alone with seed 3 + 5 samples exactly what it got inside the split batch
        alone = teacher.generate(GenerateRequest(prompts=prompts[5:], max_tokens=6, seed=8))
        assert alone.results[0] == whole.results[5]
        assert whole.usage.prompts == 6
        with pytest.raises(ValueError, match="max_generate_n"):
            teacher.generate(GenerateRequest(prompts=["a"], n=9))


def test_generated_tokens_metric(tiny_server):
    def generated() -> float:
        text = httpx.get(tiny_server + "/metrics").text
        line = next(x for x in text.splitlines() if x.startswith("opd_generated_tokens_total"))
        return float(line.split()[-1])

    before = generated()
    r = _post(tiny_server, {"prompts": ["hi"], "max_tokens": 5, "seed": 1})
    n = r.json()["usage"]["completion_tokens"]
    assert generated() - before == n
    assert np.isfinite(before)


def test_the_checkpoints_generation_defaults_do_not_change_sampling(tiny_model_dir, tmp_path):
    """A generation_config.json with sampling defaults, a repetition penalty, min_new_tokens,
    min_p and suppressed tokens must not reach /v1/generate: greedy output stays the plain
    argmax of the model's logits (transformers would fill every unset option from it)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from opd.server.backends.hf import HFBackend
    from opd.server.settings import Settings
    from opd.shared.schemas import GenerateOptions

    prompt = [1, 504, 3458, 30, 504]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    seq, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(torch.argmax(model(torch.tensor([seq])).logits[0, -1]))
            expected.append(nxt)
            seq.append(nxt)
    assert 2 not in expected  # no EOS: the argmax runs all 6 steps
    model_dir = tmp_path / "tiny-with-defaults"
    shutil.copytree(tiny_model_dir, model_dir)
    GenerationConfig(
        do_sample=True,
        temperature=0.3,
        top_k=5,
        repetition_penalty=3.0,
        min_new_tokens=6,
        min_p=0.5,
        suppress_tokens=expected[:2],  # would change the output if it were applied
        eos_token_id=2,
    ).save_pretrained(model_dir)
    backend = HFBackend(Settings(model=str(model_dir), dtype="float32", device="cpu"))
    backend.load()
    (served,) = backend.generate([prompt], GenerateOptions(max_tokens=6, temperature=0))[0]
    assert served.token_ids == expected
