"""Per-position candidate ids on the drop-in routes, against an independent float64 reference.

vLLM's convention (SamplingParams.prompt_logprob_token_ids): row i of the matrix scores its ids
as predictions of prompt token prompt_logprob_start + i + 1, and there are exactly
prompt_len - 1 - start rows. SGLang PR #38119's convention: row p of token_ids_logprob_positions
holds the ids scored as predictions of input token p, one row per input token. The cases below
put the actual next token in column 0 of every row, so an off-by-one in either direction would
show as a value that is not the actual token's log-prob; they also check against the float64
log-softmax of the model's own logits, and decode the answer as a vLLM client would.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest

from tests.support.reference import ReferenceModel

PROMPT = [5, 17, 250, 31, 9, 77, 120, 4, 66, 3]
ATOL = 1e-4  # float32 scoring against float64 logits of the whole model


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """float64 log-probs [L - 1, V]: row r predicts PROMPT[r + 1]."""
    return ReferenceModel(tiny_model_dir).reference(np.array(PROMPT), 1).logprobs_TV


def candidate_rows(start: int, extra: int = 3, seed: int = 0) -> np.ndarray:
    """Row i: the actual token s+i+1 first, then random ids; the last column of odd rows -1."""
    rng = np.random.default_rng(seed)
    rows = len(PROMPT) - 1 - start
    ids = rng.integers(0, 200, (rows, 1 + extra))
    ids[:, 0] = PROMPT[start + 1 :]
    ids[1::2, -1] = -1
    return ids


def decode_npy(text: str) -> np.ndarray:
    """What a vLLM client does with prompt_token_id_logprobs (no pickle)."""
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


def check(scores: np.ndarray, ids: np.ndarray, start: int, reference: np.ndarray) -> None:
    assert scores.dtype == np.float32 and scores.shape == ids.shape
    rows = np.arange(start, start + len(ids))  # reference row of candidate row i: start + i
    expected = np.take_along_axis(reference[rows], np.maximum(ids, 0), axis=1)
    expected[ids < 0] = -np.inf
    np.testing.assert_allclose(scores, expected, atol=ATOL, rtol=1e-5)
    # column 0 is the actual token: exactly the token's own log-prob at that position
    actual = reference[rows, np.array(PROMPT[start + 1 :])]
    np.testing.assert_allclose(scores[:, 0], actual, atol=ATOL, rtol=0)
    # an off-by-one in either direction is far from it on this case
    for shift in (-1, 1):
        wrong = reference[np.clip(rows + shift, 0, len(reference) - 1), ids[:, 0]]
        assert np.abs(wrong - scores[:, 0]).max() > 0.1


@pytest.mark.parametrize("start", [0, 3])
def test_inference_generate_candidate_ids(tiny_server, reference, start):
    """prime-rl's route, vLLM's fields and encoding; re-encoded by vLLM's own encoder the
    bytes are identical (byte-compatible with a vLLM server)."""
    from vllm.utils.serial_utils import numpy2base64

    ids = candidate_rows(start)
    body = {
        "token_ids": PROMPT,
        "sampling_params": {
            "max_tokens": 1,
            "prompt_logprobs": 1,
            "prompt_logprob_token_ids": [[int(v) for v in row if v >= 0] for row in ids]
            if start
            else ids.tolist(),
            "prompt_logprob_start": start,
        },
    }
    r = httpx.post(tiny_server + "/inference/v1/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    encoded = r.json()["prompt_token_id_logprobs"]
    scores = decode_npy(encoded)
    check(scores, ids, start, reference)  # ragged rows are padded with -1, as vLLM pads
    assert numpy2base64(scores) == encoded
    plp = r.json()["prompt_logprobs"]  # what prime-rl reads: the actual token first
    assert len(plp) == len(PROMPT) and plp[0] is None
    firsts = [next(iter(entry.values()))["logprob"] for entry in plp[1:]]
    np.testing.assert_allclose(firsts, reference[np.arange(9), PROMPT[1:]], atol=ATOL)


def test_completions_candidate_ids_per_choice(tiny_server, reference):
    """The same fields on /v1/completions: per choice, one matrix per prompt."""
    a, b = candidate_rows(2, seed=1), candidate_rows(2, seed=2)
    body = {
        "prompt": [PROMPT, PROMPT],
        "max_tokens": 0,
        "prompt_logprobs": 2,
        "prompt_logprob_token_ids": [a.tolist(), b.tolist()],
        "prompt_logprob_start": 2,
    }
    r = httpx.post(tiny_server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    for choice, ids in zip(r.json()["choices"], (a, b), strict=True):
        check(decode_npy(choice["prompt_token_id_logprobs"]), ids, 2, reference)
        assert len(choice["prompt_logprobs"]) == len(PROMPT)


def test_candidate_row_count_is_vllms_rule(tiny_server):
    body = {
        "token_ids": PROMPT,
        "sampling_params": {
            "max_tokens": 1,
            "prompt_logprob_token_ids": candidate_rows(3)[:-1].tolist(),  # one row short
            "prompt_logprob_start": 3,
        },
    }
    r = httpx.post(tiny_server + "/inference/v1/generate", json=body, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "sampling_params.prompt_logprob_token_ids"
    assert "prompt_len - 1" in err["message"]


@pytest.mark.parametrize("start", [0, 4])
def test_sglang_positions(tiny_server, reference, start):
    """SGLang PR #38119: row p predicts input token p; empty rows answer null."""
    positions: list[list[int]] = [[] for _ in PROMPT]
    for p in range(start + 1, len(PROMPT)):
        if p % 3:
            positions[p] = [PROMPT[p], 11, 42]
    body = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
        "return_logprob": True,
        "logprob_start_len": start,
        "token_ids_logprob_positions": positions,
    }
    r = httpx.post(tiny_server + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    got = meta["input_token_ids_logprobs"]
    assert len(got) == len(PROMPT) - start and got[0] is None
    for k in range(1, len(got)):
        p = start + k
        if not positions[p]:
            assert got[k] is None
            continue
        assert [t for _, t, _ in got[k]] == positions[p]
        np.testing.assert_allclose(
            [lp for lp, _, _ in got[k]], reference[p - 1, positions[p]], atol=ATOL
        )
    tokens = meta["input_token_logprobs"]
    assert tokens[0][0] is None and [t for _, t, _ in tokens] == PROMPT[start:]
    np.testing.assert_allclose(
        [lp for lp, _, _ in tokens[1:]],
        reference[np.arange(start, 9), PROMPT[start + 1 :]],
        atol=ATOL,
    )
