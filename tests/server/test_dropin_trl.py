"""TRL's own client code (the installed `trl` package, never a copy) against a real opd server.

- the sync trainers' `VLLMClient.get_sequence_logprobs` (POST /v1/completions, TRL >= 1.11);
- the async distillation worker's teacher request and readiness wait (`_AsyncRolloutLoop`);
- the binary and JSON forms of TRL <= 1.10's POST /get_sequence_logprobs/, decoded with TRL's
  own decoder.
Each gives the numbers of POST /v1/score on the same server and the shapes TRL tensorises.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.server.test_dropin_completions import TOL, score_reference
from tests.support.http import post_json

SEQS = [[5, 17, 250, 31, 9, 77, 120, 4], [300, 2, 2, 41, 8, 19]]
PROMPT_LENGTHS = [3, 2]

pytestmark = pytest.mark.filterwarnings("ignore:TRL currently supports vLLM versions")


def test_vllm_client_sequence_logprobs_equal_v1_score(tiny_server):
    from trl.generation.vllm_client import VLLMClient

    client = VLLMClient(base_url=tiny_server, connection_timeout=10)
    out = client.get_sequence_logprobs(SEQS, PROMPT_LENGTHS, top_logprobs=4, temperature=0.8)
    refs = score_reference(tiny_server, SEQS, 4, 0.8)
    for i, (seq, plen, ref) in enumerate(zip(SEQS, PROMPT_LENGTHS, refs, strict=True)):
        rows = slice(plen - 1, len(seq) - 1)  # positions plen .. L-1
        assert np.array(out["logprobs"][i]).shape == (len(seq) - plen, 4)
        np.testing.assert_allclose(out["logprobs"][i], ref.top_k_logprobs[rows], **TOL)
        assert np.array(out["logprob_token_ids"][i]).tolist() == ref.top_k_ids[rows].tolist()
        # the actual token is in every position's dict (k + 1 entries), top-k or not
        actual = np.array(out["actual_logprobs"][i])[:, 0]
        np.testing.assert_allclose(actual, ref.token_logprobs[rows], **TOL)
        assert out["actual_token_ids"][i] == [[t] for t in seq[plen:]]


def test_async_distillation_teacher_request(tiny_server):
    """The worker's readiness wait (GET /v1/models) and its teacher call, run as installed."""
    import aiohttp

    k, temperature = 3, 0.9
    loop = _teacher_loop({"default": tiny_server}, k, temperature)

    async def run():
        async with aiohttp.ClientSession() as session:
            loop.session = session
            await loop._resolve_teacher_model_names()
            name = loop.teacher_model_names["default"]
            return await loop._score_with_teacher(SEQS[0][:3], SEQS[0][3:], tiny_server, name)

    ids, lps = asyncio.run(run())
    (ref,) = score_reference(tiny_server, [SEQS[0]], k, temperature)
    assert len(ids) == len(SEQS[0]) - 3
    for j, (row_ids, row_lps) in enumerate(zip(ids, lps, strict=True)):
        pos = 3 + j
        assert len(row_ids) in (k, k + 1)  # the collator pads to k + 1: more would break it
        assert row_ids[:k] == ref.top_k_ids[pos - 1].tolist()  # rank-sorted, top-1 first
        np.testing.assert_allclose(row_lps[:k], ref.top_k_logprobs[pos - 1], **TOL)
        actual = row_ids.index(SEQS[0][pos])  # the realised token is always present
        np.testing.assert_allclose(row_lps[actual], ref.token_logprobs[pos - 1], **TOL)


@pytest.mark.parametrize("response_format", ["binary", "json"])
def test_legacy_get_sequence_logprobs(tiny_server, response_format):
    """TRL <= 1.10's route (not in the installed TRL 1.16, whose client moved to
    /v1/completions): the binary answer decoded by its documented layout."""
    body = {
        "sequences": SEQS,
        "prompt_lengths": PROMPT_LENGTHS,
        "top_logprobs": 4,
        "temperature": 0.8,
        "response_format": response_format,
    }
    answer = post_json(tiny_server + "/get_sequence_logprobs/", body)
    refs = score_reference(tiny_server, SEQS, 4, 0.8)
    if response_format == "binary":
        out = _decode(answer)
        assert answer["shape"] == [2, 5, 4] and answer["completion_lengths"] == [5, 4]
    else:
        out = answer
    for i, (seq, plen, ref) in enumerate(zip(SEQS, PROMPT_LENGTHS, refs, strict=True)):
        rows = slice(plen - 1, len(seq) - 1)
        top = [row[:4] for row in out["logprobs"][i]]
        np.testing.assert_allclose(top, ref.top_k_logprobs[rows], **TOL)
        ids = [row[:4] for row in out["logprob_token_ids"][i]]
        assert np.array(ids).tolist() == ref.top_k_ids[rows].tolist()
        if response_format == "binary":
            actual = np.array(out["actual_logprobs"][i])[:, 0]
            np.testing.assert_allclose(actual, ref.token_logprobs[rows], **TOL)
        else:  # the actual token follows the top-k when it is outside it
            for j, row in enumerate(out["logprob_token_ids"][i]):
                assert len(row) == (4 if seq[plen + j] in row[:4] else 5)


def _decode(payload: dict) -> dict:
    """TRL <= 1.10's binary layout: raw little-endian arrays in base64, [B, max_len, k]."""
    import base64

    shape = payload["shape"]
    lps = np.frombuffer(base64.b64decode(payload["logprobs_b64"]), np.float32).reshape(shape)
    ids = np.frombuffer(base64.b64decode(payload["token_ids_b64"]), np.int32).reshape(shape)
    act = np.frombuffer(base64.b64decode(payload["actual_logprobs_b64"]), np.float32)
    act = act.reshape(shape[0], shape[1], 1)
    n = payload["completion_lengths"]
    return {
        "logprobs": [lps[i, : n[i]].tolist() for i in range(shape[0])],
        "logprob_token_ids": [ids[i, : n[i]].tolist() for i in range(shape[0])],
        "actual_logprobs": [act[i, : n[i]].tolist() for i in range(shape[0])],
    }


@pytest.mark.parametrize(
    ("change", "param", "says"),
    [
        ({"top_logprobs": 65}, "top_logprobs", "max_top_k=64"),
        ({"sequences": [SEQS[0], [1, 2, 49152]]}, "sequences[1]", "vocabulary"),
        ({"sequences": [SEQS[0], [1, 2**64 - 1]]}, "sequences[1][1]", "64 bits"),
        ({"sequences": [[1] * 1025, SEQS[1]]}, "sequences[0]", "max_tokens_per_sequence=1024"),
        ({"prompt_lengths": [3, 7]}, "prompt_lengths[1]", "outside"),
        ({"prompt_lengths": [3, True]}, "prompt_lengths[1]", ""),
        ({"temperature": 1e6}, "temperature", "100.0"),
    ],
)
def test_legacy_route_refusals_name_its_fields(tiny_server, change, param, says):
    """The contract's limits and TRL's own rules, each a 400 naming TRL's field."""
    body = {"sequences": SEQS, "prompt_lengths": PROMPT_LENGTHS, "top_logprobs": 4, **change}
    err = post_json(tiny_server + "/get_sequence_logprobs/", body, 400)["error"]
    assert err["param"] == param and says in err["message"], err
    empty = {"sequences": [], "prompt_lengths": []}
    answer = post_json(tiny_server + "/get_sequence_logprobs/", empty)
    assert answer == {"logprobs": [], "logprob_token_ids": []}


def test_async_distillation_mopd_sends_each_row_to_its_own_opd_teacher(
    tiny_server, tiny_student_dir, tmp_path
):
    """TRL's multi-teacher OPD (MOPD): `teacher_server_urls` maps teacher ids to servers and
    each row's `teacher_id` picks one. Two opd servers on different models, each resolved by
    its own GET /v1/models, each row scored by its teacher only."""
    import aiohttp

    from opd.client.teacher.launch import LocalTeacher

    k, temperature = 3, 1.0
    extra = ["--served-model-name", "code-teacher"]
    with LocalTeacher(
        str(tiny_student_dir), log_path=tmp_path / "code.log", extra_args=extra
    ) as code:
        urls = {"math": tiny_server, "code": code}
        loop = _teacher_loop(urls, k, temperature)

        async def run():
            async with aiohttp.ClientSession() as session:
                loop.session = session
                await loop._resolve_teacher_model_names()
                out = {}
                for teacher_id in ("math", "code"):
                    tid, url = loop._resolve_teacher_server_url({"teacher_id": teacher_id})
                    name = loop.teacher_model_names[tid]
                    out[tid] = await loop._score_with_teacher(SEQS[0][:3], SEQS[0][3:], url, name)
                return out

        scored = asyncio.run(run())
        assert loop.teacher_model_names["code"] == "code-teacher"
        for teacher_id, (ids, lps) in scored.items():
            (ref,) = score_reference(urls[teacher_id], [SEQS[0]], k, temperature)
            for j, (row_ids, row_lps) in enumerate(zip(ids, lps, strict=True)):
                assert row_ids[:k] == ref.top_k_ids[2 + j].tolist()
                np.testing.assert_allclose(row_lps[:k], ref.top_k_logprobs[2 + j], **TOL)
        assert scored["math"][1] != scored["code"][1]  # two models: two answers
        with pytest.raises(ValueError, match="teacher_id='chat'"):
            loop._resolve_teacher_server_url({"teacher_id": "chat"})


def _teacher_loop(urls: dict[str, str], k: int, temperature: float):
    """TRL's async rollout loop with only its teacher half set up (what these tests run)."""
    from accelerate import PartialState
    from trl.experimental.async_distillation.async_rollout_worker import _AsyncRolloutLoop

    PartialState()  # the worker logs through accelerate, as in its own process
    loop = _AsyncRolloutLoop.__new__(_AsyncRolloutLoop)
    loop.teacher_server_urls = urls
    loop.teacher_model_names = {}
    loop.teacher_top_k, loop.teacher_temperature = k, temperature
    loop.request_timeout = 60
    loop._counters = {}
    return loop
