"""Admission beyond the token bound, on real `opd serve` processes (the tiny model):
expected-wait refusals (429 + Retry-After), client deadlines (429 up front, 408 once expired in
the queue, nothing computed), per-key rate limits, and API keys that never reach the log or
/metrics. The pure parts (deadline parsing, the token bucket) are checked directly first.

Each server coalesces for two seconds (OPD_MAX_WAIT_MS), so the first request of a burst sits in
the queue while the next ones arrive; the assertions hold however slow this machine is.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from opd.client import DeadlineExceededError, TeacherClient
from opd.client.teacher.base import ClientConfig
from opd.client.teacher.launch import LocalTeacher
from opd.server.admission import DEADLINE_HEADER, KeyRateLimiter, RateLimited, parse_deadline
from opd.shared.errors import ContractError
from opd.shared.schemas import ScoreRequest
from tests.support.prom import metric as metric_value

KEY_A, KEY_B = "alpha-secret-key-0123", "bravo-secret-key-4567"
BODY = {"sequences": [{"token_ids": list(range(1, 200)), "score_from": 1}]}


def test_deadline_header_parsing():
    assert parse_deadline(None) is None
    assert parse_deadline("2.5", now=10.0) == 12.5
    for bad in ("abc", "0", "-1", "nan", "inf", "1e9"):
        with pytest.raises(ContractError) as info:
            parse_deadline(bad)
        assert info.value.field == DEADLINE_HEADER and info.value.status == 400


def test_token_bucket_per_key():
    limiter = KeyRateLimiter(rps=2.0, burst=3)
    for _ in range(3):
        limiter.take("a", now=0.0)
    with pytest.raises(RateLimited) as info:
        limiter.take("a", now=0.0)
    assert info.value.retry_after == 1
    limiter.take("b", now=0.0)  # another key has its own bucket
    limiter.take("a", now=0.5)  # 0.5 s at 2 rps refills one request


@pytest.fixture(scope="module")
def waiting_server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "admission.log"
    env = {
        "OPD_LOG_LEVEL": "debug",
        "OPD_MAX_WAIT_MS": "2000",
        "OPD_MAX_QUEUE_WAIT_S": "0.000001",  # any queued work is "too long" a wait
        "OPD_API_KEYS": f'["{KEY_A}", "{KEY_B}"]',
    }
    with LocalTeacher(str(tiny_model_dir), env=env, log_path=log) as url:
        yield url, log


async def _burst(
    url: str, n: int, headers: dict[str, str], first_headers: dict[str, str] | None = None
) -> list[httpx.Response]:
    """One request, then (once the server's queue holds it) n - 1 more at once."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        first_headers = headers if first_headers is None else first_headers
        first = asyncio.create_task(c.post("/v1/score", json=BODY, headers=first_headers))
        for _ in range(3000):  # until the first request sits in its coalescing window
            if metric_value((await c.get("/metrics")).text, "opd_queue_tokens") > 0:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the first request never showed up in the queue")
        rest = await asyncio.gather(
            *[c.post("/v1/score", json=BODY, headers=headers) for _ in range(n - 1)]
        )
        return [await first, *rest]


def test_expected_wait_over_the_bound_is_429_with_retry_after(waiting_server):
    url, _ = waiting_server
    first, *rest = asyncio.run(_burst(url, 4, {"Authorization": f"Bearer {KEY_A}"}))
    assert first.status_code == 200, first.text  # an idle server admits anything
    for r in rest:  # each arrived while the first was queued
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["type"] == "queue_full" and err["field"] == "max_queue_wait_s"
        assert int(r.headers["retry-after"]) >= 1
    metrics = httpx.get(url + "/metrics").text
    assert metric_value(metrics, "opd_queue_wait_seconds_count") >= 1
    assert metric_value(metrics, "opd_time_to_first_pass_seconds_count") >= 1


def test_deadline_expired_in_the_queue_is_408_and_nothing_is_computed(waiting_server):
    url, _ = waiting_server
    before = metric_value(httpx.get(url + "/metrics").text, "opd_scored_tokens_total")
    headers = {"Authorization": f"Bearer {KEY_B}", DEADLINE_HEADER: "0.05"}
    r = httpx.post(url + "/v1/score", json=BODY, headers=headers, timeout=60)
    assert r.status_code == 408, r.text
    assert r.json()["error"]["field"] == DEADLINE_HEADER
    metrics = httpx.get(url + "/metrics").text
    assert metric_value(metrics, "opd_deadline_dropped_total") >= 1
    assert metric_value(metrics, "opd_scored_tokens_total") == before


def test_deadline_shorter_than_the_expected_wait_is_refused_up_front(tiny_model_dir, tmp_path):
    env = {"OPD_MAX_WAIT_MS": "2000", "OPD_LOG_LEVEL": "warning"}
    with LocalTeacher(str(tiny_model_dir), env=env, log_path=tmp_path / "t.log") as url:
        first, second = asyncio.run(_burst(url, 2, {DEADLINE_HEADER: "0.0001"}, {}))
        assert first.status_code == 200, first.text
        assert second.status_code == 429, second.text  # it cannot start in time
        assert second.json()["error"]["field"] == DEADLINE_HEADER
        ok = httpx.post(url + "/v1/score", json=BODY, headers={DEADLINE_HEADER: "60"}, timeout=60)
        assert ok.status_code == 200, ok.text


def test_per_key_rate_limit(tiny_model_dir, tmp_path):
    env = {
        "OPD_API_KEYS": f'["{KEY_A}", "{KEY_B}"]',
        "OPD_RATE_LIMIT_RPS": "0.01",
        "OPD_RATE_LIMIT_BURST": "2",
        "OPD_LOG_LEVEL": "warning",
    }
    with LocalTeacher(str(tiny_model_dir), env=env, log_path=tmp_path / "t.log") as url:
        a = {"Authorization": f"Bearer {KEY_A}"}
        codes = [httpx.post(url + "/v1/score", json=BODY, headers=a).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = httpx.post(url + "/v1/score", json=BODY, headers=a)
        assert r.json()["error"]["field"] == "rate_limit_rps" and int(r.headers["retry-after"]) > 1
        b = {"Authorization": f"Bearer {KEY_B}"}
        assert httpx.post(url + "/v1/score", json=BODY, headers=b).status_code == 200
        assert metric_value(httpx.get(url + "/metrics").text, "opd_rate_limited_total") == 2


def test_keys_never_reach_the_log_or_the_metrics(waiting_server):
    url, log = waiting_server
    wrong = "wrong-secret-key-8910"
    for key in (KEY_A, KEY_B, wrong):
        httpx.post(url + "/v1/score", json=BODY, headers={"Authorization": f"Bearer {key}"})
        httpx.post(url + "/v1/score", content=b"{bad", headers={"Authorization": f"Bearer {key}"})
    metrics = httpx.get(url + "/metrics").text
    text = log.read_text()
    assert "POST /v1/score" in text  # the debug log did record these requests
    for key in (KEY_A, KEY_B, wrong):
        assert key not in metrics and key not in text


def test_the_client_sends_its_deadline_and_gets_a_typed_408(waiting_server):
    url, _ = waiting_server
    assert ClientConfig([url], deadline_s=0.05).httpx_kwargs()["headers"][DEADLINE_HEADER] == "0.05"
    client = TeacherClient(url, api_key=KEY_B, deadline_s=0.05)
    with client, pytest.raises(DeadlineExceededError) as info:
        client.score(ScoreRequest.model_validate(BODY))
    assert info.value.status == 408 and info.value.detail.field == DEADLINE_HEADER
