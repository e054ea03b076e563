"""opd's verl replica without verl: its settings and the rows it lays out (verl-free modules).

The rows are checked against verl's own layout rules (verl/workers/rollout/vllm_rollout/
utils.py extract_prompt_logprobs, written out here); tests/verl runs the same code inside verl.
"""

from __future__ import annotations

import numpy as np
import pytest

from opd.client.verl.layout import PLACEHOLDER_ID, parse_call, score_request, verl_answer
from opd.client.verl.settings import DEFAULT_API_KEY_ENV, FIELD, read_settings
from opd.shared.packed import SequenceScores


def test_settings_from_engine_kwargs_or_model_path():
    s = read_settings({"opd": {"urls": ["http://a:1/", "http://b:2"]}}, "/models/x", {})
    assert s.urls == ("http://a:1", "http://b:2") and s.api_key is None
    s = read_settings({}, "http://teacher:8001", {DEFAULT_API_KEY_ENV: "k"})
    assert s.urls == ("http://teacher:8001",) and s.api_key == "k"
    s = read_settings(
        {"opd": {"urls": "http://a:1,http://b:2", "api_key_env": "MY_KEY", "timeout_s": 5}},
        None,
        {"MY_KEY": "secret"},
    )
    assert s.urls == ("http://a:1", "http://b:2") and s.api_key == "secret"
    assert s.client_kwargs()["timeout_s"] == 5.0 and s.client_kwargs()["base_url"] == list(s.urls)
    # verl's other engines' options are not opd's business
    assert read_settings({"vllm": {"max_logprobs": 8}}, "https://t", {}).urls == ("https://t",)


@pytest.mark.parametrize(
    ("engine_kwargs", "model_path", "message"),
    [
        ({}, "/models/teacher", f"{FIELD}.urls: no opd teacher URL"),
        ({"opd": {"url": "http://a"}}, None, f"{FIELD}: unknown option(s) ['url']"),
        ({"opd": {"urls": ["ftp://a"]}}, None, f"{FIELD}.urls: ['ftp://a'] are not http"),
        ({"opd": {"urls": [1]}}, None, f"{FIELD}.urls: must be a URL or a list of URLs"),
        ({"opd": {"urls": "http://a", "timeout_s": 0}}, None, f"{FIELD}.timeout_s: must be"),
        ({"opd": {"urls": "http://a", "concurrency": 1.5}}, None, f"{FIELD}.concurrency"),
        ({"opd": {"urls": "http://a", "api_key_env": ""}}, None, f"{FIELD}.api_key_env"),
    ],
)
def test_bad_settings_name_the_field(engine_kwargs, model_path, message):
    with pytest.raises(ValueError) as info:
        read_settings(engine_kwargs, model_path, {})
    assert message in str(info.value)


def verl_call(k: int | None, max_tokens: int = 1) -> dict:
    """What verl's teacher loop sends (teacher_manager._get_teacher_sampling_params)."""
    params = {"max_tokens": max_tokens, "temperature": 1.0, "detokenize": False}
    if k is not None:
        params["prompt_logprobs"] = k
    return params


def scores(n_rows: int, top_k: int, seed: int = 0) -> SequenceScores:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(1000)[: n_rows * top_k].reshape(n_rows, top_k) if top_k else None
    values = -np.sort(rng.random((n_rows, top_k)) * 5, axis=1) if top_k else None
    return SequenceScores(
        token_logprobs=-rng.random(n_rows).astype(np.float32),
        top_k_ids=ids,
        top_k_logprobs=None if values is None else values.astype(np.float32),
    )


@pytest.mark.parametrize("k", [0, 1, 4])
def test_rows_follow_verls_layout(k):
    tokens = [5, 9, 2, 7, 3]
    call = parse_call(tokens, verl_call(k))
    request = score_request(call)
    assert request is not None
    (seq,) = request.sequences
    assert seq.token_ids == [*tokens, PLACEHOLDER_ID] and seq.score_from == 1
    assert request.top_k == max(k, 1) and request.temperature == 1.0
    s = scores(len(tokens), max(k, 1))  # rows about tokens 1..4 and the placeholder
    answer = verl_answer(call, s)
    ids, logps = answer.extra_fields["prompt_ids"], answer.extra_fields["prompt_logprobs"]
    # one row per token, row j about token j + 1, the last a row of zeros of width max(K, 1)
    assert len(ids) == len(logps) == len(tokens)
    assert ids[-1] == [0] * max(k, 1) and logps[-1] == [0.0] * max(k, 1)
    if k == 0:  # the actual token and its log-prob
        assert ids[:-1] == [[t] for t in tokens[1:]]
        np.testing.assert_array_equal(np.array(logps[:-1])[:, 0], s.token_logprobs[:4])
    else:  # the teacher's top-K in rank order
        assert ids[:-1] == s.top_k_ids[:4, :k].tolist()
        np.testing.assert_array_equal(np.array(logps[:-1]), s.top_k_logprobs[:4, :k])
    # the generated token: the teacher's greedy choice after the whole sequence
    assert answer.token_ids == [int(s.top_k_ids[4, 0])]
    assert answer.log_probs == [float(s.top_k_logprobs[4, 0])]


def test_no_next_token_and_no_rows():
    call = parse_call([5, 9, 2], verl_call(3, max_tokens=0))
    request = score_request(call)
    assert request is not None and request.sequences[0].token_ids == [5, 9, 2]
    answer = verl_answer(call, scores(2, 3))
    assert answer.token_ids == [] and len(answer.extra_fields["prompt_ids"]) == 3
    # nothing asked for: no request at all, and no rows (vLLM returns none either)
    call = parse_call([5, 9], verl_call(None, max_tokens=0))
    assert score_request(call) is None
    assert verl_answer(call, None).extra_fields == {}
    # a one-token sequence has only the zero row
    call = parse_call([5], verl_call(2, max_tokens=0))
    assert score_request(call) is None
    assert verl_answer(call, None).extra_fields == {
        "prompt_ids": [[0, 0]],
        "prompt_logprobs": [[0.0, 0.0]],
    }


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_tokens": 4}, "sampling_params.max_tokens: 4 > 1"),
        ({"top_p": 0.9}, "sampling_params: ['top_p'] are not taken"),
        ({"prompt_logprobs": -1}, "sampling_params.prompt_logprobs: must be a whole number"),
        ({"prompt_logprobs": True}, "sampling_params.prompt_logprobs: must be a whole number"),
        ({"temperature": 0}, "sampling_params.temperature: must be > 0"),
        ({"temperature": "hot"}, "sampling_params.temperature: must be a number"),
        ({"n": 2}, "sampling_params.n: must be 1"),
        ({"logprobs": 5}, "sampling_params.logprobs: 5"),
    ],
)
def test_requests_this_replica_cannot_answer_are_refused(params, message):
    with pytest.raises(ValueError) as info:
        parse_call([1, 2, 3], params)
    assert message in str(info.value)


def test_an_empty_sequence_is_refused():
    with pytest.raises(ValueError, match="prompt_ids: empty"):
        parse_call([], verl_call(0))
