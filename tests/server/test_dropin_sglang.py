"""POST /generate in SGLang's shape, as slime's on-policy distillation sends it, on a real
`opd serve` process: the numbers of POST /v1/score, SGLang's layout of meta_info."""

from __future__ import annotations

import numpy as np
import pytest

from tests.server.test_dropin_completions import TOL, score_reference
from tests.support.http import post_json

SEQ = [5, 17, 250, 31, 9, 77, 120, 4]


def slime_request(tokens: list[int], temperature: float = 1.0) -> dict:
    """slime/rollout/on_policy_distillation.py's payload, field for field."""
    return {
        "input_ids": tokens,
        "sampling_params": {
            "temperature": temperature,
            "max_new_tokens": 0,
            "skip_special_tokens": False,
        },
        "return_logprob": True,
        "logprob_start_len": 0,
    }


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_slime_request_reads_what_slime_reads(tiny_server, temperature):
    out = post_json(tiny_server + "/generate", slime_request(SEQ, temperature))
    assert list(out) == ["text", "output_ids", "meta_info"]
    assert out["text"] == "" and out["output_ids"] == []
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 0}
    assert meta["prompt_tokens"] == len(SEQ) and meta["completion_tokens"] == 0
    items = meta["input_token_logprobs"]
    assert len(items) == len(SEQ) and items[0] == [None, SEQ[0], None]
    assert [t for _, t, _ in items] == SEQ and all(text is None for *_, text in items)
    assert meta["output_token_logprobs"] == []
    # what slime does with it: item[0] of [1:], the last response_length of them
    teacher = [item[0] for item in items[1:]]
    (ref,) = score_reference(tiny_server, [SEQ], 0, temperature)
    np.testing.assert_allclose(teacher, ref.token_logprobs, **TOL)


def test_top_logprobs_text_start_and_batch(tiny_server):
    body = {
        "input_ids": [SEQ, SEQ[:5]],
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": 2,
        "top_logprobs_num": 3,
        "return_text_in_logprobs": True,
    }
    first, second = post_json(tiny_server + "/generate", body)  # a list, in input order
    refs = score_reference(tiny_server, [SEQ, SEQ[:5]], 3, 1.0)
    for out, seq, ref in ((first, SEQ, refs[0]), (second, SEQ[:5], refs[1])):
        meta = out["meta_info"]
        tokens, top = meta["input_token_logprobs"], meta["input_top_logprobs"]
        assert len(tokens) == len(top) == len(seq) - 2  # input tokens 2 .. L-1
        assert tokens[0][0] is None and top[0] is None  # SGLang never scores token s
        assert all(isinstance(text, str) for *_, text in tokens)
        np.testing.assert_allclose([t[0] for t in tokens[1:]], ref.token_logprobs[2:], **TOL)
        for k, row in enumerate(top[1:], start=2):
            assert [t for _, t, _ in row] == ref.top_k_ids[k].tolist()
            np.testing.assert_allclose([lp for lp, *_ in row], ref.top_k_logprobs[k], **TOL)


def test_default_start_and_one_new_token(tiny_server):
    """logprob_start_len -1 (SGLang's default): no input positions; max_new_tokens 1: the
    greedy next token with its log-prob."""
    body = {"input_ids": SEQ, "sampling_params": {"max_new_tokens": 1}, "return_logprob": True}
    meta = post_json(tiny_server + "/generate", body)["meta_info"]
    assert meta["input_token_logprobs"] == [] and meta["completion_tokens"] == 1
    ((lp, token, _),) = meta["output_token_logprobs"]
    assert isinstance(token, int) and lp <= 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"sampling_params": {"max_new_tokens": 16}}, "sampling_params.max_new_tokens"),
        ({"logprob_start_len": 99}, "logprob_start_len"),
        ({"input_ids": []}, "input_ids"),
        ({"input_ids": [1, 99999]}, "input_ids"),
        ({"stream": True}, "stream"),
        ({"token_ids_logprob_positions": [[1]]}, "token_ids_logprob_positions"),
        # the contract's limits, in SGLang's names (tiny_server: max_top_k 64, 1,024 tokens)
        ({"top_logprobs_num": 65}, "top_logprobs_num"),
        ({"input_ids": [[1, 2], [3] * 1025]}, "input_ids[1]"),
        ({"token_ids_logprob": [4, 49152]}, "token_ids_logprob"),
        (
            {"sampling_params": {"max_new_tokens": 0, "temperature": 1e6}},
            "sampling_params.temperature",
        ),
        # strict integers: past int64, a bool, a float
        ({"input_ids": [1, 2**63]}, "input_ids[1]"),
        ({"sampling_params": {"max_new_tokens": True}}, "sampling_params.max_new_tokens"),
        ({"sampling_params": {"max_new_tokens": 0, "n": 1.0}}, "sampling_params.n"),
        ({"logprob_start_len": 0.0}, "logprob_start_len"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(tiny_server, body, param):
    full = {**slime_request(SEQ), **body}
    error = post_json(tiny_server + "/generate", full, 400)["error"]
    assert error["param"] == param and error["message"]
    post_json(tiny_server + "/generate", slime_request(SEQ))


def test_no_prompts_is_an_empty_answer(tiny_server):
    assert post_json(tiny_server + "/generate", {"text": []}) == []
