"""Zero 5xx for any input: hostile bodies on every POST route of a real `opd serve` process.

Two fuzzers, both against `strict_server` (API key, small limits, so limits are reached often):
- hypothesis mutations (tests/support/fuzz.py): structural JSON, msgpack fields and raw bytes,
  on every route; each answer must be < 500 and, when refused, name the field;
- schemathesis over /openapi.json (every route, its coverage and fuzzing phases), as the
  installed CLI, with its `not_a_server_error` check.
After both, the server still scores. OPD_FUZZ_EXAMPLES scales the case counts and
OPD_FUZZ_REPORT=path.json writes the status tally (docs/reliability.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opd.shared.version import JSON_MEDIA_TYPE, MSGPACK_MEDIA_TYPE
from tests.support.fuzz import (
    ROUTES,
    Tally,
    examples,
    mutated_bytes,
    mutated_json,
    mutated_msgpack,
    valid_json,
    valid_msgpack_score,
)
from tests.support.keys import TEST_API_KEY

AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
TALLY = Tally()
HTTP = settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
DROPIN = {"/v1/completions", "/inference/v1/generate", "/generate", "/get_sequence_logprobs/"}


@pytest.fixture(scope="module")
def client(strict_server):
    with httpx.Client(base_url=strict_server, headers=AUTH, timeout=120) as c:
        yield c
    report = os.environ.get("OPD_FUZZ_REPORT")
    if report:
        TALLY.write(Path(report))


def _send(client: httpx.Client, kind: str, route: str, body: bytes, media: str) -> None:
    r = client.post(route, content=body, headers={"content-type": media})
    TALLY.add(f"{kind} {route}", r.status_code)
    assert r.status_code < 500, (route, body[:300], r.text)
    if r.status_code in (400, 413, 415, 422):
        err = r.json()["error"]
        named = err.get("param") if route in DROPIN else err.get("field")
        assert named, (route, r.text)  # every refusal names the field to fix
        assert not err["message"].startswith("None"), r.text


@pytest.mark.parametrize("route", ROUTES)
def test_structural_json_mutations(client, route):
    @HTTP
    @given(mutated_json(route))
    def run(body):
        _send(client, "json", route, body, JSON_MEDIA_TYPE)

    run()


@pytest.mark.parametrize("route", ROUTES)
def test_byte_mutations_of_json(client, route):
    @HTTP
    @given(st.data())
    def run(data):
        _send(client, "bytes", route, data.draw(mutated_bytes(valid_json(route))), JSON_MEDIA_TYPE)

    run()


def test_msgpack_field_mutations(client):
    @settings(HTTP, max_examples=examples(200))
    @given(mutated_msgpack())
    def run(body):
        _send(client, "msgpack", "/v1/score", body, MSGPACK_MEDIA_TYPE)

    run()


def test_byte_mutations_of_msgpack(client):
    valid = msgpack.packb(valid_msgpack_score(), use_bin_type=True)

    @settings(HTTP, max_examples=examples(200))
    @given(st.data())
    def run(data):
        _send(
            client,
            "msgpack-bytes",
            "/v1/score",
            data.draw(mutated_bytes(valid)),
            MSGPACK_MEDIA_TYPE,
        )

    run()


def test_schemathesis_over_openapi(strict_server, client, tmp_path):
    """The installed schemathesis CLI, every route of /openapi.json, no 5xx."""
    # beside this interpreter (the venv's bin/, which need not be on PATH), else on PATH
    here = Path(sys.executable).with_name("st")
    st_cli = str(here) if here.exists() else shutil.which("st")
    assert st_cli, "schemathesis is a dev dependency (pyproject.toml)"
    cmd = [
        st_cli, "run", f"{strict_server}/openapi.json",
        "--checks", "not_a_server_error",
        "--max-examples", str(examples(10)),
        "--seed", "7",
        "--request-timeout", "60",
        "--header", f"Authorization: Bearer {TEST_API_KEY}",
        "--report", "junit", "--report-dir", str(tmp_path),
        "--no-color",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "generated" in run.stdout and "0 passed" not in run.stdout.split("Test cases:")[-1]


def test_server_still_serves_after_the_fuzz(client):
    r = client.post("/v1/score", json={"sequences": [{"token_ids": [1, 2, 3], "score_from": 1}]})
    assert r.status_code == 200 and len(r.json()["results"][0]["token_logprobs"]) == 2
