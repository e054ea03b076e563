"""Batching across clients, backpressure, failures, health, metrics and graceful shutdown."""

from __future__ import annotations

import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from opd.client.teacher.launch import LocalTeacher
from opd.server.app import create_app
from opd.server.backends.hf import HFBackend
from opd.server.settings import Settings
from tests.support.inproc import SlowLoadingBackend, serve_in_thread
from tests.support.prom import metric


def _body(n_tokens: int, seed: int = 0, top_k: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "sequences": [{"token_ids": rng.integers(0, 1000, n_tokens).tolist(), "score_from": 1}],
        "top_k": top_k,
        "entropy": True,
    }


def test_concurrent_clients_share_forward_passes(tiny_server):
    with httpx.Client(base_url=tiny_server, timeout=60) as http:
        before = http.get("/metrics").text
        barrier = threading.Barrier(12)

        def one(i: int) -> httpx.Response:
            barrier.wait()
            return http.post("/v1/score", json=_body(20 + i, seed=i))

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(one, range(12)))
        assert all(r.status_code == 200 for r in responses)
        after = http.get("/metrics").text
    passes = metric(after, "opd_batch_sequences_count") - metric(
        before, "opd_batch_sequences_count"
    )
    seqs = metric(after, "opd_batch_sequences_sum") - metric(before, "opd_batch_sequences_sum")
    assert seqs == 12
    assert passes < 12, "12 concurrent requests should not need 12 forward passes"


def test_full_queue_is_429_with_retry_after_then_serves(coalescing_server):
    barrier = threading.Barrier(6)

    def one(i: int) -> httpx.Response:
        barrier.wait()
        return httpx.post(coalescing_server + "/v1/score", json=_body(40, seed=i), timeout=60)

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(one, range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            err = r.json()["error"]
            assert err["type"] == "queue_full"
            assert err["field"] == "max_queue_tokens" and err["limit"] == 64
    r = httpx.post(coalescing_server + "/v1/score", json=_body(10), timeout=60)
    assert r.status_code == 200


class PoisonBackend(HFBackend):
    """The real HF backend, except that token id 48000 makes it raise (fault injection)."""

    def score_pack(self, items):
        if any(48000 in it.token_ids for it in items):
            raise RuntimeError("poisoned token")
        return super().score_pack(items)


def test_backend_exception_is_500_with_request_id_and_server_keeps_serving(tiny_model_dir, caplog):
    settings = Settings(model=str(tiny_model_dir), max_wait_ms=0)
    app = create_app(settings, backend_factory=PoisonBackend)
    with serve_in_thread(app) as url, caplog.at_level("ERROR"):
        bad = {"sequences": [{"token_ids": [1, 48000, 2], "score_from": 1}]}
        r = httpx.post(url + "/v1/score", json=bad, headers={"X-Request-ID": "req-abc"})
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["type"] == "internal_error" and err["request_id"] == "req-abc"
        assert "req-abc" in caplog.text
        for _ in range(2):
            assert httpx.post(url + "/v1/score", json=_body(8)).status_code == 200


def test_health_and_readiness_while_loading(tiny_model_dir):
    SlowLoadingBackend.release.clear()
    app = create_app(Settings(model=str(tiny_model_dir)), backend_factory=SlowLoadingBackend)
    with serve_in_thread(app, wait_ready=False) as url:
        assert httpx.get(url + "/healthz").status_code == 200
        r = httpx.get(url + "/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.get(url + "/v1/model")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        SlowLoadingBackend.release.set()
        deadline = time.monotonic() + 60
        while httpx.get(url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(url + "/v1/model").status_code == 200


def test_model_info_metrics_and_openapi(tiny_server):
    info = httpx.get(tiny_server + "/v1/model").json()
    assert info["vocab_size"] == 49152 and info["backend"] == "hf"
    assert info["max_model_len"] == 1024
    assert info["limits"]["max_tokens_per_sequence"] == 1024  # clamped to the context
    # 1.1 generate, 1.2 token_rank, 1.3 spans, 1.4 GET /v1/tokenizer
    assert info["protocol_version"] == "1.4"
    assert re.fullmatch(r"[0-9a-f]{64}", info["tokenizer_fingerprint"])
    assert info["revision"].startswith("sha256:")
    assert httpx.post(tiny_server + "/v1/score", json=_body(12)).status_code == 200
    text = httpx.get(tiny_server + "/metrics").text
    for name in (
        "opd_requests_total",
        "opd_request_latency_seconds_bucket",
        "opd_scored_tokens_total",
        "opd_batch_sequences_bucket",
        "opd_batch_fill_bucket",
        "opd_queue_tokens",
        "opd_payload_bytes_in_total",
        "opd_payload_bytes_out_total",
        "opd_ready",
    ):
        assert name in text, name
    assert metric(text, "opd_requests_total", route="/v1/score", status="200") >= 1
    assert metric(text, "opd_scored_tokens_total") >= 11
    # how the replica runs its model, for dashboards and the bench's records
    [setup] = [
        s.labels
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "opd_backend_info" and s.value == 1
    ]
    assert setup["backend"] == "hf" and setup["device"] == "cpu"
    assert int(setup["streams"]) >= 1 and setup["cpu_gemm"] in ("torch", "numpy")
    spec = httpx.get(tiny_server + "/openapi.json").json()
    content = spec["paths"]["/v1/score"]["post"]["requestBody"]["content"]
    assert "application/json" in content and "application/vnd.opd+msgpack" in content
    generate = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]
    assert list(generate) == ["application/json"]
    assert httpx.get(tiny_server + "/docs").status_code == 200


def test_graceful_shutdown_finishes_in_flight_and_refuses_new(tiny_model_dir, tmp_path):
    teacher = LocalTeacher(
        str(tiny_model_dir),
        env={"OPD_MAX_WAIT_MS": "2000"},  # each request waits 2 s in the batcher
        log_path=tmp_path / "drain.log",
    )
    url = teacher.start()
    results: dict[str, httpx.Response] = {}

    def in_flight() -> None:
        results["r"] = httpx.post(url + "/v1/score", json=_body(16), timeout=60)

    thread = threading.Thread(target=in_flight)
    thread.start()
    time.sleep(0.5)
    assert teacher.process is not None
    teacher.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.post(url + "/v1/score", json=_body(8), timeout=10)
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "unavailable"
    assert httpx.get(url + "/readyz").json()["status"] == "draining"
    thread.join(30)
    assert results["r"].status_code == 200
    assert len(results["r"].json()["results"][0]["token_logprobs"]) == 15
    assert teacher.process.wait(30) == 0
