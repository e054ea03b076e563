"""TeacherClient / AsyncTeacherClient against real server processes."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

from opd.client import (
    AsyncTeacherClient,
    AuthenticationError,
    IncompatibleTeacherError,
    TeacherClient,
    TeacherConnectionError,
)
from opd.client.teacher.launch import LocalTeacher, free_port
from opd.server.app import create_app
from opd.server.settings import Settings
from opd.shared.errors import ContractError
from opd.shared.packed import PackedRequest
from opd.shared.schemas import ScoreOptions, ScoreRequest, SequenceIn
from tests.support.inproc import SlowLoadingBackend, serve_in_thread
from tests.support.keys import TEST_API_KEY
from tests.support.prom import metric, score_requests


def _batch(seed: int, n: int, lo: int, hi: int, k: int = 4, top_k: int = 4):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, 49152, int(rng.integers(lo, hi))) for _ in range(n)]
    sf = [int(rng.integers(1, len(s))) for s in seqs]
    cands = [rng.integers(0, 49152, (len(s) - f, k)) for s, f in zip(seqs, sf, strict=True)]
    return PackedRequest.from_arrays(seqs, sf, cands, ScoreOptions(top_k=top_k, entropy=True))


def _assert_same(a, b, atol=1e-5):
    assert a.n_sequences == b.n_sequences
    np.testing.assert_array_equal(a.scored_offsets_n1, b.scored_offsets_n1)
    for name in ("token_logprobs_N", "candidate_logprobs_NK", "top_k_logprobs_Nk", "entropy_N"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=atol, rtol=0)


def test_sync_and_async_clients_agree_and_accept_the_pydantic_request(tiny_server):
    request = ScoreRequest(
        top_k=3,
        entropy=True,
        sequences=[
            SequenceIn(token_ids=[1, 2, 3, 4, 5], score_from=2, candidate_ids=[[7, 8]] * 3),
            SequenceIn(token_ids=[9, 10], score_from=1, candidate_ids=[[7, 8]]),
        ],
    )
    with TeacherClient(tiny_server) as sync_client:
        sync_result = sync_client.score(request)
        json_result = TeacherClient(tiny_server, encoding="json").score(request)

    async def run():
        async with AsyncTeacherClient(tiny_server) as client:
            return await client.score(request)

    async_result = asyncio.run(run())
    _assert_same(sync_result, async_result, atol=0)
    _assert_same(sync_result, json_result, atol=0)
    assert [len(s.token_logprobs) for s in sync_result.sequences()] == [3, 1]
    assert sync_result.sequence(0).candidate_logprobs.shape == (3, 2)
    assert sync_result.sequence(0).top_k_ids.shape == (3, 3)


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_large_batch_is_split_under_the_servers_limits(strict_server, tiny_server, encoding):
    """strict_server allows 4 sequences / 256 tokens / 4 KiB per request; 11 sequences of up to
    120 tokens must go out as several requests and come back whole, in order."""
    request = _batch(seed=3, n=11, lo=40, hi=120)
    before = score_requests(strict_server, status="200")
    with TeacherClient(strict_server, api_key=TEST_API_KEY, encoding=encoding) as client:
        split = client.score(request)
    sent = score_requests(strict_server, status="200") - before
    assert sent >= 4, f"expected several requests, saw {sent}"
    with TeacherClient(tiny_server) as client:  # same model, no limits to speak of
        whole = client.score(request)
    # The pieces run in other packs than the whole: a one-sequence pack runs on all cores with
    # torch's BLAS, larger ones on the single-thread streams, possibly with numpy's BLAS
    # (opd.modeling.cpu_gemm). float32 rounds differently on each path, so the bound is the
    # batch-invariance test's (tests/server/test_numerics.py).
    _assert_same(split, whole, atol=1e-4)


def _spans_batch(seed: int, n: int, lo: int, hi: int, k: int = 4):
    """n sequences with 1 to 3 scored spans each (gaps between them, some touching the end)."""
    rng = np.random.default_rng(seed)
    seqs, spans, cands = [], [], []
    for _ in range(n):
        length = int(rng.integers(lo, hi))
        cuts = np.sort(rng.choice(np.arange(1, length + 1), size=6, replace=False))
        pairs = [(int(a), int(b)) for a, b in zip(cuts[::2], cuts[1::2], strict=True)]
        pairs = pairs[: int(rng.integers(1, 4))]
        seqs.append(rng.integers(0, 49152, length))
        spans.append(pairs)
        cands.append(rng.integers(0, 49152, (sum(b - a for a, b in pairs), k)))
    options = ScoreOptions(top_k=4, entropy=True, token_rank=True)
    return PackedRequest.from_arrays(seqs, None, cands, options, spans=spans)


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_a_batch_with_spans_is_split_with_its_spans(strict_server, tiny_server, encoding):
    """Scored spans travel with their sequence when the client splits a batch under the
    server's limits: the pieces give the numbers of the whole, row for row."""
    request = _spans_batch(seed=5, n=9, lo=40, hi=120)
    before = score_requests(strict_server, status="200")
    with TeacherClient(strict_server, api_key=TEST_API_KEY, encoding=encoding) as client:
        split = client.score(request)
    assert score_requests(strict_server, status="200") - before >= 3
    with TeacherClient(tiny_server, encoding=encoding) as client:
        whole = client.score(request)
    np.testing.assert_array_equal(split.scored_offsets_n1, request.scored_offsets_n1)
    _assert_same(split, whole, atol=1e-4)  # other packs, other BLAS paths: see above


def test_client_refuses_locally_what_the_server_would_refuse(strict_server):
    request = PackedRequest.from_arrays([[1, 2, 3], [1] * 200], [1, 1])
    before = score_requests(strict_server, status="422")
    client = TeacherClient(strict_server, api_key=TEST_API_KEY)
    with client, pytest.raises(ContractError) as info:
        client.score(request)
    assert info.value.field == "sequences[1].token_ids" and info.value.limit == 128
    assert score_requests(strict_server, status="422") == before


def test_wrong_api_key_is_authentication_error(strict_server):
    client = TeacherClient(strict_server, api_key="nope", max_retries=0)
    with client, pytest.raises(AuthenticationError) as info:
        client.connect()
    assert info.value.status == 401


def test_tokenizer_fingerprint_mismatch_is_refused_unless_overridden(tiny_server):
    info = httpx.get(tiny_server + "/v1/model").json()
    with TeacherClient(tiny_server, tokenizer_fingerprint=info["tokenizer_fingerprint"]) as c:
        assert c.connect().name == info["name"]
    client = TeacherClient(tiny_server, tokenizer_fingerprint="0" * 64)
    with client, pytest.raises(IncompatibleTeacherError, match="tokenizer fingerprint mismatch"):
        client.score(_batch(0, 1, 5, 10))
    with TeacherClient(
        tiny_server, tokenizer_fingerprint="0" * 64, allow_tokenizer_mismatch=True
    ) as client:
        assert client.score(_batch(0, 1, 5, 10)).n_sequences == 1


def test_429s_are_retried_with_backoff_until_served(coalescing_server):
    """The coalescing server holds only 64 queued tokens; 8 concurrent 40-token requests
    overflow it, get 429 + Retry-After, and the client retries each until it is served."""
    requests = [_batch(seed=i, n=1, lo=40, hi=41) for i in range(8)]
    before = score_requests(coalescing_server, status="429")

    async def run():
        async with AsyncTeacherClient(coalescing_server, max_retries=30) as client:
            return await asyncio.gather(*(client.score(r) for r in requests))

    results = asyncio.run(run())
    assert all(r.n_sequences == 1 and len(r.token_logprobs_N) >= 1 for r in results)
    assert score_requests(coalescing_server, status="429") > before


def test_connection_errors_are_retried_until_the_teacher_is_up(tiny_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    teacher = LocalTeacher(str(tiny_model_dir), port=port, log_path=tmp_path / "late.log")
    starter = threading.Timer(1.0, teacher.start)
    starter.start()
    try:
        with TeacherClient(url, max_retries=40, backoff_base_s=0.2, backoff_max_s=2) as client:
            started = time.monotonic()
            result = client.score(_batch(1, 2, 5, 20))
            assert time.monotonic() - started >= 0.5  # it really had to wait
        assert result.n_sequences == 2
    finally:
        starter.join()
        teacher.stop()


def test_unreachable_teacher_is_a_connection_error_after_retries():
    url = f"http://127.0.0.1:{free_port()}"
    client = TeacherClient(url, max_retries=2, backoff_base_s=0.01)
    with client, pytest.raises(TeacherConnectionError, match="after 3 attempts"):
        client.connect()


def test_503_while_loading_is_retried(tiny_model_dir):
    """A teacher that is still loading answers 503 + Retry-After; the client waits it out."""
    SlowLoadingBackend.release.clear()
    app = create_app(Settings(model=str(tiny_model_dir)), backend_factory=SlowLoadingBackend)
    with serve_in_thread(app, wait_ready=False) as url:
        threading.Timer(1.5, SlowLoadingBackend.release.set).start()
        with TeacherClient(url, max_retries=20) as client:
            result = client.score(_batch(2, 3, 5, 30))
        assert result.n_sequences == 3
        text = httpx.get(url + "/metrics").text
        assert metric(text, "opd_requests_total", status="503") >= 1
