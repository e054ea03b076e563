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

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opd.shared.version import JSON_MEDIA_TYPE, MSGPACK_MEDIA_TYPE
from tests.support.fuzz import (
    ROUTES,
    SEEDS,
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


# Every integer and float of a route's valid body replaced, one at a time, by values that have
# broken servers: past int64 (orjson hands 2**63 .. 2**64-1 over as Python ints, which numpy
# cannot hold), the int64 floor, a negative, a float or a bool where an int goes, a deep list.
_DEEP = json.loads("[" * 60 + "1" + "]" * 60)
HOSTILE = [2**63, 2**64 - 1, -(2**63), -1, 0.5, True, _DEEP]
# The bodies the hostile values go into: the fuzz seeds (each servable as it is).
VALID = SEEDS


def _number_leaves(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """Paths of the int and float leaves of `value` (a list's first and last items only)."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _number_leaves(child, (*path, key))
    elif isinstance(value, list) and value:
        for i in sorted({0, len(value) - 1}):
            yield from _number_leaves(value[i], (*path, i))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path


def _replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    out = copy.copy(value)
    out[path[0]] = _replaced(value[path[0]], path[1:], new)
    return out


def _hostile_cases(route: str) -> list[tuple[str, bytes, set[str]]]:
    """(case id, body, the keys on the changed leaf's path: a refusal must name one of them)."""
    cases = []
    for path in _number_leaves(VALID[route]):
        keys = {p for p in path if isinstance(p, str)}
        name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
        for value in HOSTILE:
            body = json.dumps(_replaced(VALID[route], path, value)).encode()
            label = "deep" if value is _DEEP else repr(value)
            cases.append((f"{name}={label}", body, keys))
    return cases


def _refusal_names(r: httpx.Response, route: str) -> str:
    err = r.json()["error"]
    return (err.get("param") if route in DROPIN else err.get("field")) or ""


@pytest.mark.parametrize("route", ROUTES)
def test_the_bodies_mutated_below_are_servable(client, route):
    r = client.post(route, json=VALID[route])
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("route", ROUTES)
def test_hostile_numbers_in_every_field_are_refused_naming_it(client, route):
    """Huge, negative, float, bool and deeply nested values where a route's numbers go: never a
    5xx, and a refusal names the field that was changed."""
    for case, body, keys in _hostile_cases(route):
        r = client.post(route, content=body, headers={"content-type": JSON_MEDIA_TYPE})
        TALLY.add(f"hostile {route}", r.status_code)
        assert r.status_code < 500, (route, case, r.text)
        if r.status_code >= 400:
            named = _refusal_names(r, route)
            assert any(k in named for k in keys), (route, case, r.text)


_PAST_INT64 = [2**63, 2**64 - 1]
_TOKEN_ID_BODIES = {
    "/v1/score": lambda big: {"sequences": [{"token_ids": [1, big, 3], "score_from": 1}]},
    "/v1/generate": lambda big: {"prompt_token_ids": [[1, big]], "max_tokens": 1},
    "/v1/completions": lambda big: {"prompt": [[1, 2], [3, big]], "max_tokens": 1},
    "/inference/v1/generate": lambda big: {"token_ids": [1, big], "sampling_params": {}},
    "/generate": lambda big: {"input_ids": [1, big], "sampling_params": {"max_new_tokens": 0}},
    "/get_sequence_logprobs/": lambda big: {"sequences": [[1, 2, big]], "prompt_lengths": [1]},
}
_CANDIDATE_BODIES = {
    "/v1/completions": lambda big: {
        "prompt": [1, 2, 3],
        "max_tokens": 0,
        "prompt_logprob_token_ids": [[1, big], [2, 3]],
    },
    "/inference/v1/generate": lambda big: {
        "token_ids": [1, 2, 3],
        "sampling_params": {"max_tokens": 0, "prompt_logprob_token_ids": [[big], [2]]},
    },
    "/generate": lambda big: {
        "input_ids": [1, 2, 3],
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": 0,
        "token_ids_logprob": [4, big],
    },
}


@pytest.mark.parametrize("big", _PAST_INT64, ids=["2**63", "2**64-1"])
@pytest.mark.parametrize("route", ROUTES)
def test_token_ids_past_int64_are_a_4xx_naming_the_field(client, route, big):
    """The fuzz find: /get_sequence_logprobs/ with an id above 2**63 was a 500 (OverflowError
    in numpy). Every route, token ids and candidate ids alike."""
    bodies = [_TOKEN_ID_BODIES[route](big)]
    if route in _CANDIDATE_BODIES:
        bodies.append(_CANDIDATE_BODIES[route](big))
    for body in bodies:
        r = client.post(route, json=body)
        TALLY.add(f"past-int64 {route}", r.status_code)
        assert 400 <= r.status_code < 500, (body, r.text)
        assert _refusal_names(r, route), r.text


def test_msgpack_scalars_past_int64_and_of_wrong_types(client):
    """The binary /v1/score envelope's scalar fields, each replaced by the hostile values (and
    n_candidates past int64 with an empty candidate matrix, which once reached numpy's reshape)."""
    valid = valid_msgpack_score()
    keys = ["top_k", "n_candidates", "temperature", "entropy", "token_rank", "protocol_version"]
    bodies = [(k, {**valid, k: v}) for k in keys for v in [*HOSTILE, 2**64 - 1, math.inf]]
    bodies += [("n_candidates", {**valid, "n_candidates": big, "candidate_ids": b""})
               for big in [2**31, 2**63, 2**64 - 1]]  # fmt: skip
    for key, body in bodies:
        r = client.post(
            "/v1/score",
            content=msgpack.packb(body, use_bin_type=True),
            headers={"content-type": MSGPACK_MEDIA_TYPE},
        )
        TALLY.add("hostile-msgpack /v1/score", r.status_code)
        assert r.status_code < 500, (key, body.get(key), r.text)
        if r.status_code >= 400:
            assert r.json()["error"]["field"], r.text


@pytest.mark.parametrize("route", ROUTES)
def test_bodies_nested_past_the_parser_limit_are_a_400(client, route):
    key = next(iter(SEEDS[route]))
    body = f'{{"{key}": ' + "[" * 1100 + "]" * 1100 + "}"
    r = client.post(route, content=body, headers={"content-type": JSON_MEDIA_TYPE})
    assert r.status_code == 400, r.text
    assert _refusal_names(r, route) == "body"


def test_server_still_serves_after_the_fuzz(client):
    r = client.post("/v1/score", json={"sequences": [{"token_ids": [1, 2, 3], "score_from": 1}]})
    assert r.status_code == 200 and len(r.json()["results"][0]["token_logprobs"]) == 2
