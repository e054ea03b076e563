"""Bad input gets a clear 4xx naming the field and the limit; the server keeps serving.

Runs against `strict_server`: a real process with an API key and small limits
(4 sequences, 128 tokens per sequence, 256 per request, top_k and candidates <= 8, 4 KiB body).
"""

from __future__ import annotations

import json

import httpx
import msgpack
import numpy as np
import pytest

from opd.shared.codec import encode_request_msgpack
from opd.shared.packed import PackedRequest
from opd.shared.schemas import ScoreOptions
from opd.shared.version import MSGPACK_MEDIA_TYPE, PROTOCOL_VERSION
from tests.support.keys import TEST_API_KEY

AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
VOCAB = 49152


def _ok_body(**overrides):
    body = {"sequences": [{"token_ids": [1, 2, 3, 4], "score_from": 2}], "top_k": 2}
    body.update(overrides)
    return body


def _post_json(url, body, headers=AUTH):
    return httpx.post(url + "/v1/score", json=body, headers=headers, timeout=60)


def _assert_still_serving(url):
    r = _post_json(url, _ok_body())
    assert r.status_code == 200, r.text
    assert len(r.json()["results"][0]["token_logprobs"]) == 2


def _error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    assert err["request_id"] == r.headers["x-request-id"]
    return err


CASES = [
    # (description, body, expected field, expected limit)
    (
        "token id >= vocab",
        _ok_body(sequences=[{"token_ids": [1, 2, VOCAB], "score_from": 1}]),
        "sequences[0].token_ids[2]",
        VOCAB,
    ),
    (
        "negative token id",
        _ok_body(sequences=[{"token_ids": [1, -5, 3], "score_from": 1}]),
        "sequences[0].token_ids[1]",
        VOCAB,
    ),
    (
        "empty sequence",
        _ok_body(sequences=[{"token_ids": [], "score_from": 1}]),
        "sequences[0].token_ids",
        2,
    ),
    (
        "score_from past the end",
        _ok_body(sequences=[{"token_ids": [1, 2, 3], "score_from": 3}]),
        "sequences[0].score_from",
        2,
    ),
    (
        "score_from zero",
        _ok_body(sequences=[{"token_ids": [1, 2, 3], "score_from": 0}]),
        "sequences[0].score_from",
        1,
    ),
    (
        "too many sequences",
        _ok_body(sequences=[{"token_ids": [1, 2], "score_from": 1}] * 5),
        "sequences",
        4,
    ),
    (
        "sequence too long",
        _ok_body(sequences=[{"token_ids": [1] * 129, "score_from": 1}]),
        "sequences[0].token_ids",
        128,
    ),
    (
        "too many tokens in total",
        _ok_body(sequences=[{"token_ids": [1] * 100, "score_from": 1}] * 3),
        "sequences",
        256,
    ),
    ("top_k above max_top_k", _ok_body(top_k=9), "top_k", 8),
    ("temperature zero", _ok_body(temperature=0), "temperature", 0),
    (
        "candidate rows != scored positions",
        _ok_body(sequences=[{"token_ids": [1, 2, 3, 4], "score_from": 2, "candidate_ids": [[1]]}]),
        "sequences[0].candidate_ids",
        2,
    ),
    (
        "ragged candidate rows",
        _ok_body(
            sequences=[{"token_ids": [1, 2, 3], "score_from": 1, "candidate_ids": [[1, 2], [3]]}]
        ),
        "sequences[0].candidate_ids[1]",
        2,
    ),
    (
        "too many candidates",
        _ok_body(sequences=[{"token_ids": [1, 2], "score_from": 1, "candidate_ids": [[1] * 9]}]),
        "candidate_ids",
        8,
    ),
    (
        "candidate id out of vocab",
        _ok_body(
            sequences=[
                {"token_ids": [1, 2, 3], "score_from": 1, "candidate_ids": [[1, 2], [3, VOCAB + 7]]}
            ]
        ),
        "sequences[0].candidate_ids[1][1]",
        VOCAB,
    ),
    ("unknown option", _ok_body(topk=3), "topk", None),
    ("wrong type", _ok_body(top_k="many"), "top_k", None),
    # scored spans (protocol 1.3): [start, end) ranges of a 6-token sequence
    (
        "overlapping spans",
        _ok_body(sequences=[{"token_ids": [1] * 6, "score_spans": [[1, 4], [3, 5]]}]),
        "sequences[0].score_spans[1]",
        4,
    ),
    (
        "unsorted spans",
        _ok_body(sequences=[{"token_ids": [1] * 6, "score_spans": [[4, 5], [1, 2]]}]),
        "sequences[0].score_spans[1]",
        5,
    ),
    (
        "empty span",
        _ok_body(sequences=[{"token_ids": [1] * 6, "score_spans": [[1, 2], [3, 3]]}]),
        "sequences[0].score_spans[1]",
        4,
    ),
    (
        "no span",
        _ok_body(sequences=[{"token_ids": [1] * 6, "score_spans": []}]),
        "sequences[0].score_spans",
        1,
    ),
    (
        "span starting at 0",
        _ok_body(sequences=[{"token_ids": [1] * 6, "score_spans": [[0, 2]]}]),
        "sequences[0].score_spans[0]",
        1,
    ),
    (
        "span past the end",
        _ok_body(
            sequences=[
                {"token_ids": [1, 2], "score_from": 1},
                {"token_ids": [1] * 6, "score_spans": [[1, 2], [5, 7]]},
            ]
        ),
        "sequences[1].score_spans[1]",
        6,
    ),
    (
        "span not a pair",
        _ok_body(sequences=[{"token_ids": [1] * 6, "score_spans": [[1, 2, 3]]}]),
        "sequences[0].score_spans[0]",
        2,
    ),
    (
        "both score_from and score_spans",
        _ok_body(sequences=[{"token_ids": [1] * 6, "score_from": 1, "score_spans": [[1, 2]]}]),
        "sequences[0].score_spans",
        None,
    ),
    (
        "neither score_from nor score_spans",
        _ok_body(sequences=[{"token_ids": [1] * 6}]),
        "sequences[0].score_from",
        None,
    ),
    (
        "candidate rows != span positions",
        _ok_body(
            sequences=[
                {"token_ids": [1] * 6, "score_spans": [[1, 2], [4, 6]], "candidate_ids": [[1]] * 2}
            ]
        ),
        "sequences[0].candidate_ids",
        3,
    ),
    (
        "score_from out of range beside spans",
        _ok_body(
            sequences=[
                {"token_ids": [1] * 6, "score_spans": [[1, 2]]},
                {"token_ids": [1, 2, 3], "score_from": 3},
            ]
        ),
        "sequences[1].score_from",
        2,
    ),
]


@pytest.mark.parametrize("name,body,field,limit", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_422_naming_field_and_limit(strict_server, name, body, field, limit):
    err = _error(_post_json(strict_server, body), 422)
    assert err["field"] == field, err
    if limit is not None:
        assert err["limit"] == limit, err
        assert str(limit) in err["message"] or name == "score_from zero", err
    _assert_still_serving(strict_server)


def test_binary_bad_input_names_the_same_fields(strict_server):
    req = PackedRequest.from_arrays([[1, 2, VOCAB + 1]], [1], None, ScoreOptions())
    r = httpx.post(
        strict_server + "/v1/score",
        content=encode_request_msgpack(req),
        headers={**AUTH, "Content-Type": MSGPACK_MEDIA_TYPE},
    )
    err = _error(r, 422)
    assert err["field"] == "sequences[0].token_ids[2]"


def _post_msgpack(url, envelope):
    return httpx.post(
        url + "/v1/score",
        content=msgpack.packb(envelope, use_bin_type=True),
        headers={**AUTH, "Content-Type": MSGPACK_MEDIA_TYPE},
    )


def test_binary_spans_are_checked_like_json_ones(strict_server):
    """The binary form's span keys: the same rules and field names as JSON's score_spans, and
    the keys' own shape (both or neither, start/end pairs, score_from = first start)."""
    req = PackedRequest.from_arrays(
        [[1, 2, 3, 4, 5, 6], [7, 8, 9]],
        None,
        None,
        ScoreOptions(),
        spans=[[(1, 3), (2, 4)], [(2, 3)]],
    )
    err = _error(_post_msgpack(strict_server, msgpack.unpackb(encode_request_msgpack(req))), 422)
    assert err["field"] == "sequences[0].score_spans[1]" and err["limit"] == 3
    ok = PackedRequest.from_arrays(
        [[1, 2, 3, 4, 5, 6], [7, 8, 9]],
        None,
        None,
        ScoreOptions(),
        spans=[[(1, 3), (4, 6)], [(2, 3)]],
    )
    envelope = msgpack.unpackb(encode_request_msgpack(ok))
    r = _post_msgpack(strict_server, envelope)
    assert r.status_code == 200, r.text
    cases = [
        ({"spans": None}, "spans", None),
        ({"span_offsets": None}, "span_offsets", None),
        ({"spans": np.array([1, 3, 4], "<i4").tobytes()}, "spans", 2),
        ({"span_offsets": np.array([0, 3], "<i8").tobytes()}, "span_offsets", 3),
        ({"score_from": np.array([2, 2], "<i4").tobytes()}, "sequences[0].score_from", 1),
    ]
    for change, field, limit in cases:
        err = _error(_post_msgpack(strict_server, {**envelope, **change}), 422)
        assert err["field"] == field, (change, err)
        if limit is not None:
            assert err["limit"] == limit, (change, err)
    _assert_still_serving(strict_server)


def test_integers_past_int64_are_refused_naming_the_field(strict_server):
    """JSON integers up to 2**64 - 1 parse, but no id array holds them; msgpack's n_candidates
    past int32 once reached numpy's reshape of an empty candidate matrix (a 500)."""
    body = _ok_body(sequences=[{"token_ids": [1, 2**64 - 1, 3], "score_from": 1}])
    err = _error(_post_json(strict_server, body), 422)
    assert err["field"] == "sequences" and err["limit"] == 2**31 - 1
    req = PackedRequest.from_arrays([[1, 2, 3]], [1], None, ScoreOptions())
    envelope = msgpack.unpackb(encode_request_msgpack(req))
    envelope.update(n_candidates=2**63, candidate_ids=b"")
    r = httpx.post(
        strict_server + "/v1/score",
        content=msgpack.packb(envelope, use_bin_type=True),
        headers={**AUTH, "Content-Type": MSGPACK_MEDIA_TYPE},
    )
    err = _error(r, 422)
    assert err["field"] == "n_candidates" and err["limit"] == 2**31 - 1
    _assert_still_serving(strict_server)


@pytest.mark.parametrize(
    "content,ctype",
    [
        (b'{"sequences": [', "application/json"),
        (b"\xff\xfe not json", "application/json"),
        (b"\xc1\xc1\xc1", MSGPACK_MEDIA_TYPE),
        (msgpack.packb([1, 2, 3]), MSGPACK_MEDIA_TYPE),
        (
            msgpack.packb(
                {
                    "protocol_version": PROTOCOL_VERSION,
                    "token_ids": b"\x01\x02\x03",
                    "seq_offsets": np.array([0, 1]).tobytes(),
                    "score_from": np.array([1], "<i4").tobytes(),
                }
            ),
            MSGPACK_MEDIA_TYPE,
        ),
    ],
    ids=[
        "truncated-json",
        "binary-garbage-json",
        "invalid-msgpack",
        "msgpack-not-map",
        "msgpack-bad-array-length",
    ],
)
def test_malformed_bodies_are_400(strict_server, content, ctype):
    r = httpx.post(
        strict_server + "/v1/score", content=content, headers={**AUTH, "Content-Type": ctype}
    )
    err = _error(r, 400)
    assert err["type"] == "malformed_body"
    _assert_still_serving(strict_server)


def test_body_over_limit_is_413(strict_server):
    padded = json.dumps(_ok_body()) + " " * 5000  # valid JSON, but 5 KB
    r = httpx.post(
        strict_server + "/v1/score",
        content=padded,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    err = _error(r, 413)
    assert err["field"] == "body" and err["limit"] == 4096

    # also without a Content-Length header (chunked upload): refused while streaming
    def chunks():
        for _ in range(10):
            yield b" " * 1000

    r = httpx.post(
        strict_server + "/v1/score",
        content=chunks(),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert _error(r, 413)["limit"] == 4096
    _assert_still_serving(strict_server)


def test_unsupported_media_type_is_415(strict_server):
    r = httpx.post(
        strict_server + "/v1/score", content=b"a=b", headers={**AUTH, "Content-Type": "text/csv"}
    )
    assert _error(r, 415)["field"] == "Content-Type"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TEST_API_KEY},
        {"Authorization": f"Basic {TEST_API_KEY}"},
    ],
    ids=["missing", "wrong-key", "no-scheme", "basic-scheme"],
)
def test_api_key_required_on_v1_routes(strict_server, headers):
    for method, path in (("POST", "/v1/score"), ("GET", "/v1/model")):
        r = httpx.request(method, strict_server + path, json=_ok_body(), headers=headers)
        err = _error(r, 401)
        assert err["field"] == "Authorization"
        assert r.headers["www-authenticate"] == "Bearer"
    # health and metrics stay open for probes and scrapers
    assert httpx.get(strict_server + "/healthz").status_code == 200
    assert httpx.get(strict_server + "/readyz").status_code == 200
    _assert_still_serving(strict_server)


def test_unknown_route_is_404_in_the_error_shape(strict_server):
    err = _error(httpx.get(strict_server + "/v1/nope", headers=AUTH), 404)
    assert err["type"] == "http_error"
