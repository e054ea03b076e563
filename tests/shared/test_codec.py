"""The wire codecs (JSON and msgpack) and the packed in-memory form they both map to.

Everything here is pure contract code: no model, no server, no mocks. Ragged batches are drawn
from a numpy generator with a fixed seed so every run checks the same data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest

from opd.shared.codec import (
    decode_request_json,
    decode_request_msgpack,
    decode_result_msgpack,
    encode_request_msgpack,
    encode_result_msgpack,
    result_from_json_dict,
    result_to_json_dict,
)
from opd.shared.errors import ContractError
from opd.shared.limits import Limits
from opd.shared.packed import PackedRequest, PackedResult
from opd.shared.schemas import ScoreOptions, ScoreRequest, ScoreResponseJSON, SequenceIn
from opd.shared.validation import validate_request
from opd.shared.version import PROTOCOL_VERSION

VOCAB = 49_152

# ---- helpers ---------------------------------------------------------------------------------


def random_score_request(
    rng: np.random.Generator,
    n: int,
    n_candidates: int = 0,
    vocab: int = VOCAB,
    **options: Any,
) -> ScoreRequest:
    """A ragged batch of n sequences (2..40 tokens each) as a pydantic ScoreRequest."""
    sequences = []
    for _ in range(n):
        length = int(rng.integers(2, 41))
        score_from = int(rng.integers(1, length))
        seq: dict[str, Any] = {
            "token_ids": rng.integers(0, vocab, size=length).tolist(),
            "score_from": score_from,
        }
        if n_candidates:
            seq["candidate_ids"] = rng.integers(
                0, vocab, size=(length - score_from, n_candidates)
            ).tolist()
        sequences.append(seq)
    return ScoreRequest.model_validate({"sequences": sequences, **options})


def assert_packed_request_equal(a: PackedRequest, b: PackedRequest) -> None:
    np.testing.assert_array_equal(a.token_ids_T, b.token_ids_T)
    np.testing.assert_array_equal(a.seq_offsets_n1, b.seq_offsets_n1)
    np.testing.assert_array_equal(a.score_from_n, b.score_from_n)
    assert a.token_ids_T.dtype == b.token_ids_T.dtype == np.int32
    assert a.seq_offsets_n1.dtype == b.seq_offsets_n1.dtype == np.int64
    assert a.score_from_n.dtype == b.score_from_n.dtype == np.int64
    if a.candidate_ids_NK is None:
        assert b.candidate_ids_NK is None
    else:
        assert b.candidate_ids_NK is not None
        assert a.candidate_ids_NK.shape == b.candidate_ids_NK.shape
        assert a.candidate_ids_NK.dtype == b.candidate_ids_NK.dtype == np.int32
        np.testing.assert_array_equal(a.candidate_ids_NK, b.candidate_ids_NK)
    assert a.options == b.options
    assert a.has_spans == b.has_spans
    if a.has_spans:
        np.testing.assert_array_equal(a.span_offsets_n1, b.span_offsets_n1)
        np.testing.assert_array_equal(a.spans_S2, b.spans_S2)
        assert a.spans_S2.dtype == b.spans_S2.dtype == np.int64
    else:
        assert a.span_offsets_n1 is None and b.span_offsets_n1 is None


def random_result(
    rng: np.random.Generator,
    n_scored: list[int],
    top_k: int = 0,
    n_candidates: int = 0,
    entropy: bool = False,
    id_high: int = VOCAB,
    **meta: Any,
) -> PackedResult:
    offsets = np.zeros(len(n_scored) + 1, dtype=np.int64)
    np.cumsum(n_scored, out=offsets[1:])
    total = int(offsets[-1])

    def lp(*shape: int) -> np.ndarray:
        return (-rng.exponential(3.0, size=shape)).astype(np.float32)

    return PackedResult(
        scored_offsets_n1=offsets,
        token_logprobs_N=lp(total),
        candidate_logprobs_NK=lp(total, n_candidates) if n_candidates else None,
        top_k_ids_Nk=rng.integers(0, id_high, size=(total, top_k)).astype(np.int32)
        if top_k
        else None,
        top_k_logprobs_Nk=np.sort(lp(total, top_k), axis=1)[:, ::-1].copy() if top_k else None,
        entropy_N=rng.exponential(2.0, size=total).astype(np.float32) if entropy else None,
        **meta,
    )


_RESULT_ARRAYS = (
    "scored_offsets_n1",
    "token_logprobs_N",
    "candidate_logprobs_NK",
    "top_k_ids_Nk",
    "top_k_logprobs_Nk",
    "entropy_N",
)


def assert_result_equal(a: PackedResult, b: PackedResult, float_dtype: str | None = None) -> None:
    for name in _RESULT_ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None, name
            continue
        assert y is not None, name
        assert x.shape == y.shape, name
        if float_dtype is not None and name not in ("scored_offsets_n1", "top_k_ids_Nk"):
            assert y.dtype == np.dtype(float_dtype), name
            x = x.astype(float_dtype)
        np.testing.assert_array_equal(x, y, err_msg=name)
    for attr in ("model", "temperature", "logprob_dtype", "protocol_version", "input_tokens"):
        assert getattr(a, attr) == getattr(b, attr), attr


def unpack(body: bytes) -> dict[str, Any]:
    return msgpack.unpackb(body, raw=False)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def small_request_map() -> dict[str, Any]:
    req = PackedRequest.from_arrays(
        [[1, 2, 3, 4], [5, 6, 7]],
        [2, 1],
        candidate_ids=[np.array([[1, 2], [3, 4]]), np.array([[5, 6], [7, 8]])],
        options=ScoreOptions(top_k=3),
    )
    return unpack(encode_request_msgpack(req))


def small_result_map() -> dict[str, Any]:
    res = random_result(np.random.default_rng(7), [3, 2], top_k=2, n_candidates=2, entropy=True)
    return unpack(encode_result_msgpack(res))


_DROP = object()


def changed(obj: dict[str, Any], key: str, value: Any = _DROP) -> dict[str, Any]:
    """A copy of obj with `key` set to `value`, or without `key` when no value is given."""
    out = dict(obj)
    if value is _DROP:
        del out[key]
    else:
        out[key] = value
    return out


def refusal(decode: Callable[[bytes], Any], body: Any) -> ContractError:
    """The ContractError `decode` raises on `body` (anything else: packed as msgpack first)."""
    with pytest.raises(ContractError) as info:
        decode(body if isinstance(body, bytes) else pack(body))
    return info.value


# ---- msgpack requests ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n_candidates", [0, 1, 5])
def test_msgpack_request_round_trip(seed: int, n_candidates: int) -> None:
    rng = np.random.default_rng(seed)
    request = random_score_request(
        rng,
        n=int(rng.integers(1, 12)),
        n_candidates=n_candidates,
        top_k=int(rng.integers(0, 33)),
        entropy=bool(seed % 2),
        temperature=float(rng.uniform(0.1, 3.0)),
        logprob_dtype="float16" if seed % 2 else "float32",
    )
    packed = PackedRequest.from_request(request)
    decoded = decode_request_msgpack(encode_request_msgpack(packed))
    assert_packed_request_equal(packed, decoded)
    assert decoded.n_candidates == n_candidates
    for i, seq in enumerate(request.sequences):
        assert decoded.tokens(i).tolist() == seq.token_ids
        assert int(decoded.score_from_n[i]) == seq.score_from
        cands = decoded.candidates(i)
        if n_candidates:
            assert cands is not None
            assert cands.tolist() == seq.candidate_ids
        else:
            assert cands is None


def test_msgpack_request_round_trip_keeps_every_option() -> None:
    options = ScoreOptions(top_k=17, entropy=True, temperature=0.123456789, logprob_dtype="float16")
    packed = PackedRequest.from_arrays([[3, 1, 4, 1, 5]], [2], options=options)
    decoded = decode_request_msgpack(encode_request_msgpack(packed))
    assert decoded.options == options
    assert decoded.options.temperature == 0.123456789  # float64 on the wire, not float32


def test_msgpack_request_is_little_endian_raw_arrays() -> None:
    rng = np.random.default_rng(11)
    packed = PackedRequest.from_request(random_score_request(rng, n=5, n_candidates=3, top_k=4))
    obj = unpack(encode_request_msgpack(packed))
    assert obj["protocol_version"] == PROTOCOL_VERSION
    assert obj["top_k"] == 4
    assert obj["n_candidates"] == 3
    for key in ("token_ids", "seq_offsets", "score_from", "candidate_ids"):
        assert isinstance(obj[key], bytes), key
    np.testing.assert_array_equal(np.frombuffer(obj["token_ids"], "<i4"), packed.token_ids_T)
    np.testing.assert_array_equal(np.frombuffer(obj["seq_offsets"], "<i8"), packed.seq_offsets_n1)
    np.testing.assert_array_equal(np.frombuffer(obj["score_from"], "<i4"), packed.score_from_n)
    assert packed.candidate_ids_NK is not None
    np.testing.assert_array_equal(
        np.frombuffer(obj["candidate_ids"], "<i4"), packed.candidate_ids_NK.reshape(-1)
    )
    # Exactly the raw bytes, no header or padding.
    assert obj["token_ids"] == packed.token_ids_T.astype("<i4").tobytes()
    assert len(obj["candidate_ids"]) == 4 * packed.candidate_ids_NK.size


def test_msgpack_request_without_candidates_sends_nil() -> None:
    packed = PackedRequest.from_arrays([[1, 2, 3]], [1])
    obj = unpack(encode_request_msgpack(packed))
    assert obj["candidate_ids"] is None
    assert obj["n_candidates"] == 0


def test_msgpack_request_accepts_another_minor_version() -> None:
    obj = small_request_map()
    obj["protocol_version"] = "1.99"
    decoded = decode_request_msgpack(pack(obj))
    assert decoded.tokens(0).tolist() == [1, 2, 3, 4]


def test_msgpack_request_without_protocol_version_is_refused() -> None:
    # as in JSON, where ScoreRequest requires it: a request must say which contract it speaks
    err = refusal(decode_request_msgpack, changed(small_request_map(), "protocol_version"))
    assert (err.status, err.field) == (422, "protocol_version")


# ---- JSON requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_candidates", [0, 4])
def test_json_request_matches_from_request(n_candidates: int) -> None:
    rng = np.random.default_rng(100 + n_candidates)
    request = random_score_request(
        rng, n=7, n_candidates=n_candidates, top_k=5, entropy=True, temperature=0.5
    )
    body = request.model_dump_json().encode()
    from_json = decode_request_json(body)
    assert_packed_request_equal(PackedRequest.from_request(request), from_json)
    # ... and the two encodings of one request decode to the same thing.
    assert_packed_request_equal(
        from_json, decode_request_msgpack(encode_request_msgpack(from_json))
    )


def test_json_request_defaults() -> None:
    body = b'{"sequences": [{"token_ids": [1, 2, 3], "score_from": 1}]}'
    packed = decode_request_json(body)
    assert packed.options == ScoreOptions()
    assert packed.options.top_k == 0
    assert packed.options.entropy is False
    assert packed.options.temperature == 1.0
    assert packed.options.logprob_dtype == "float32"
    assert packed.candidate_ids_NK is None
    assert packed.n_scored_n.tolist() == [2]


@pytest.mark.parametrize("body", [b"{", b"not json", b'{"sequences": [}', b"\xff\xfe\x00"])
def test_json_request_malformed_is_400(body: bytes) -> None:
    err = refusal(decode_request_json, body)
    assert (err.status, err.kind) == (400, "malformed_body")


def _json_body(**top: Any) -> dict[str, Any]:
    return {"sequences": [{"token_ids": [1, 2, 3], "score_from": 1}], **top}


@pytest.mark.parametrize(
    ("body", "field", "limit"),
    [
        (_json_body(top_k=-1), "top_k", 0),
        (_json_body(temperature=0), "temperature", 0),
        (_json_body(logprob_dtype="float64"), "logprob_dtype", None),
        (_json_body(bogus=1), "bogus", None),
        (_json_body(sequences=[]), "sequences", 1),
        ({"sequences": [{"token_ids": [1, 2, 3], "score_from": 0}]}, "sequences[0].score_from", 1),
        (
            {
                "sequences": [
                    {"token_ids": [1, 2, 3], "score_from": 1},
                    {"token_ids": [1, 2], "score_from": 1, "extra": True},
                ]
            },
            "sequences[1].extra",
            None,
        ),
        (
            {"sequences": [{"token_ids": [1, "x", 3], "score_from": 1}]},
            "sequences[0].token_ids[1]",
            None,
        ),
        (
            {
                "sequences": [
                    {"token_ids": [1, 2, 3], "score_from": 1, "candidate_ids": [[1], ["a"]]}
                ]
            },
            "sequences[0].candidate_ids[1][0]",
            None,
        ),
        ({"sequences": [{"token_ids": [1, 2, 3]}]}, "sequences[0].score_from", None),
        ({}, "sequences", None),
    ],
)
def test_json_request_pydantic_invalid_is_422_with_readable_path(
    body: dict[str, Any], field: str, limit: Any
) -> None:
    err = refusal(decode_request_json, json.dumps(body).encode())
    assert err.status == 422
    assert err.kind == "validation_error"
    assert err.field == field
    assert err.message.startswith(f"{field}: ")
    if limit is not None:
        assert err.limit == limit


def test_json_request_token_id_beyond_int32_is_422() -> None:
    body = _json_body(sequences=[{"token_ids": [1, 2**31], "score_from": 1}])
    err = refusal(decode_request_json, json.dumps(body).encode())
    assert (err.status, err.limit) == (422, 2**31 - 1)
    assert "token_ids" in (err.field or "")


# BUG (shared/packed.py, PackedRequest.from_request, the np.fromiter / np.asarray calls with
# dtype=np.int64): an integer that pydantic accepts but that does not fit in int64 (JSON has no
# integer bound) makes numpy raise OverflowError instead of a ContractError, so the server
# answers 500 instead of 422. This test fails until from_request range-checks before packing.
@pytest.mark.parametrize(
    "sequence",
    [
        {"token_ids": [1, 2**64], "score_from": 1},
        {"token_ids": [1, 2, 3], "score_from": 2**64},
        {"token_ids": [1, 2], "score_from": 1, "candidate_ids": [[2**64]]},
    ],
    ids=["token_id", "score_from", "candidate_id"],
)
def test_BUG_json_request_integer_beyond_int64_is_contract_error(sequence: dict) -> None:
    body = json.dumps({"sequences": [sequence]}).encode()
    assert refusal(decode_request_json, body).status == 422


# ---- msgpack request errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        b"\x82\xa1a",  # truncated map
        pack({"token_ids": b""}) + b"\x00",  # trailing data
        b"\x81\x01\x02",  # {1: 2}: a non-string key
    ],
    ids=["empty", "reserved-byte", "truncated", "trailing", "int-key"],
)
def test_msgpack_request_undecodable_is_400(body: bytes) -> None:
    err = refusal(decode_request_msgpack, body)
    assert (err.status, err.kind) == (400, "malformed_body")


def test_msgpack_request_truncated_real_body_is_400() -> None:
    body = pack(small_request_map())
    assert refusal(decode_request_msgpack, body[:-5]).status == 400


@pytest.mark.parametrize("value", [[1, 2, 3], "a string", 5, None, b"bytes"])
def test_msgpack_request_non_map_is_400(value: Any) -> None:
    err = refusal(decode_request_msgpack, pack(value))
    assert err.status == 400
    assert "map" in err.message


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("token_ids", b"\x01\x00\x00\x00\x02\x00"),  # 6 bytes: not a whole number of int32
        ("seq_offsets", b"\x00" * 12),  # 12 bytes: not a whole number of int64
        ("score_from", b"\x01\x00\x00"),
        ("candidate_ids", b"\x01\x00\x00\x00\x02"),
    ],
)
def test_msgpack_request_bin_length_not_matching_dtype_is_400(key: str, raw: bytes) -> None:
    err = refusal(decode_request_msgpack, changed(small_request_map(), key, raw))
    assert (err.status, err.field) == (400, key)


@pytest.mark.parametrize("key", ["token_ids", "seq_offsets", "score_from", "candidate_ids"])
def test_msgpack_request_array_not_bin_is_400(key: str) -> None:
    err = refusal(decode_request_msgpack, changed(small_request_map(), key, [1, 2, 3]))
    assert (err.status, err.field) == (400, key)


def test_msgpack_request_candidates_not_multiple_of_n_candidates_is_422() -> None:
    cands = np.arange(7, dtype="<i4").tobytes()  # n_candidates is 2
    err = refusal(decode_request_msgpack, changed(small_request_map(), "candidate_ids", cands))
    assert (err.status, err.field, err.limit) == (422, "candidate_ids", 2)


@pytest.mark.parametrize("n_candidates", [0, -1, "2", 1.5])
def test_msgpack_request_bad_n_candidates_is_422(n_candidates: Any) -> None:
    obj = changed(small_request_map(), "n_candidates", n_candidates)
    err = refusal(decode_request_msgpack, obj)
    assert (err.status, err.field) == (422, "n_candidates")


@pytest.mark.parametrize("key", ["token_ids", "seq_offsets", "score_from"])
def test_msgpack_request_missing_required_key_is_422(key: str) -> None:
    err = refusal(decode_request_msgpack, changed(small_request_map(), key))
    assert (err.status, err.field) == (422, key)


def test_msgpack_request_empty_map_names_first_missing_key() -> None:
    err = refusal(decode_request_msgpack, {})
    # protocol_version is checked first: it says how to read the rest
    assert (err.status, err.field) == (422, "protocol_version")


@pytest.mark.parametrize("unknown", ["tokens", "topk", "score_from_n"])
def test_msgpack_request_unknown_key_is_422(unknown: str) -> None:
    err = refusal(decode_request_msgpack, changed(small_request_map(), unknown, 1))
    assert (err.status, err.field) == (422, unknown)
    assert unknown in err.message


@pytest.mark.parametrize("version", ["2.0", "0.9", "10.0", 2])
def test_msgpack_request_wrong_major_version_is_422(version: Any) -> None:
    obj = changed(small_request_map(), "protocol_version", version)
    err = refusal(decode_request_msgpack, obj)
    assert (err.status, err.field, err.limit) == (422, "protocol_version", PROTOCOL_VERSION)


@pytest.mark.parametrize(
    ("key", "value"),
    [("top_k", -1), ("temperature", 0.0), ("logprob_dtype", "bfloat16"), ("entropy", "maybe")],
)
def test_msgpack_request_invalid_option_is_422(key: str, value: Any) -> None:
    err = refusal(decode_request_msgpack, changed(small_request_map(), key, value))
    assert (err.status, err.field) == (422, key)


def test_msgpack_request_empty_offsets_is_422() -> None:
    err = refusal(decode_request_msgpack, changed(small_request_map(), "seq_offsets", b""))
    assert (err.status, err.field) == (422, "seq_offsets")


# ---- results ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_msgpack_result_round_trip(dtype: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_scored = rng.integers(1, 30, size=int(rng.integers(1, 10))).tolist()
    res = random_result(
        rng,
        n_scored,
        top_k=int(rng.integers(1, 20)),
        n_candidates=int(rng.integers(1, 8)),
        entropy=True,
        model="teacher/x",
        temperature=0.75,
        input_tokens=1234,
    ).cast(dtype)
    body = encode_result_msgpack(res)
    decoded = decode_result_msgpack(body)
    assert_result_equal(res, decoded, float_dtype=dtype)
    assert decoded.top_k_ids_Nk is not None and decoded.top_k_ids_Nk.dtype == np.int32
    assert unpack(body)["ids_dtype"] == "uint16"
    for i in range(res.n_sequences):
        np.testing.assert_array_equal(
            decoded.sequence(i).token_logprobs, res.sequence(i).token_logprobs
        )


def test_msgpack_result_float16_equals_values_after_cast() -> None:
    rng = np.random.default_rng(5)
    res32 = random_result(rng, [10, 20], top_k=4, n_candidates=2, entropy=True)
    decoded = decode_result_msgpack(encode_result_msgpack(res32.cast("float16")))
    assert decoded.logprob_dtype == "float16"
    assert decoded.token_logprobs_N.dtype == np.float16
    np.testing.assert_array_equal(decoded.token_logprobs_N, res32.token_logprobs_N.astype("f2"))
    np.testing.assert_array_equal(decoded.top_k_logprobs_Nk, res32.top_k_logprobs_Nk.astype("f2"))
    np.testing.assert_array_equal(decoded.entropy_N, res32.entropy_N.astype("f2"))
    np.testing.assert_array_equal(decoded.top_k_ids_Nk, res32.top_k_ids_Nk)  # ids are not cast


@pytest.mark.parametrize(
    ("max_id", "ids_dtype", "wire"),
    [(65_535, "uint16", "<u2"), (65_536, "int32", "<i4"), (151_935, "int32", "<i4")],
)
def test_msgpack_result_ids_dtype_switches_at_65536(max_id: int, ids_dtype: str, wire: str) -> None:
    rng = np.random.default_rng(max_id)
    res = random_result(rng, [4, 3], top_k=3, id_high=1000)
    assert res.top_k_ids_Nk is not None
    res.top_k_ids_Nk[-1, -1] = max_id
    res.top_k_ids_Nk[0, 0] = 0
    body = encode_result_msgpack(res)
    obj = unpack(body)
    assert obj["ids_dtype"] == ids_dtype
    assert len(obj["top_k_ids"]) == np.dtype(wire).itemsize * res.top_k_ids_Nk.size
    np.testing.assert_array_equal(
        np.frombuffer(obj["top_k_ids"], wire).reshape(res.top_k_ids_Nk.shape), res.top_k_ids_Nk
    )
    decoded = decode_result_msgpack(body)
    np.testing.assert_array_equal(decoded.top_k_ids_Nk, res.top_k_ids_Nk)
    assert int(decoded.top_k_ids_Nk.max()) == max_id


def test_msgpack_result_without_optional_arrays() -> None:
    res = random_result(np.random.default_rng(3), [5, 1, 2], model="m", input_tokens=9)
    body = encode_result_msgpack(res)
    obj = unpack(body)
    for key in ("candidate_logprobs", "top_k_ids", "top_k_logprobs", "entropy"):
        assert obj[key] is None, key
    assert obj["top_k"] == 0
    assert obj["n_candidates"] == 0
    decoded = decode_result_msgpack(body)
    assert_result_equal(res, decoded)


def test_msgpack_result_is_little_endian_raw_arrays() -> None:
    rng = np.random.default_rng(9)
    res = random_result(rng, [3, 4], top_k=2, n_candidates=3, entropy=True, input_tokens=17)
    res16 = res.cast("float16")
    obj = unpack(encode_result_msgpack(res16))
    assert obj["logprob_dtype"] == "float16"
    assert obj["top_k"] == 2 and obj["n_candidates"] == 3
    assert obj["usage"] == {"sequences": 2, "input_tokens": 17, "scored_tokens": 7}
    np.testing.assert_array_equal(np.frombuffer(obj["scored_offsets"], "<i8"), [0, 3, 7])
    np.testing.assert_array_equal(
        np.frombuffer(obj["token_logprobs"], "<f2"), res16.token_logprobs_N
    )
    np.testing.assert_array_equal(
        np.frombuffer(obj["candidate_logprobs"], "<f2").reshape(7, 3), res16.candidate_logprobs_NK
    )
    np.testing.assert_array_equal(
        np.frombuffer(obj["top_k_logprobs"], "<f2").reshape(7, 2), res16.top_k_logprobs_Nk
    )
    np.testing.assert_array_equal(np.frombuffer(obj["entropy"], "<f2"), res16.entropy_N)
    obj32 = unpack(encode_result_msgpack(res))
    assert obj32["token_logprobs"] == res.token_logprobs_N.astype("<f4").tobytes()


def test_msgpack_result_bin_length_not_matching_shape_is_400() -> None:
    for key, cut in [
        ("token_logprobs", 2),
        ("candidate_logprobs", 4),
        ("top_k_ids", 2),
        ("top_k_logprobs", 4),
        ("entropy", 4),
    ]:
        obj = small_result_map()
        err = refusal(decode_result_msgpack, changed(obj, key, obj[key][:-cut]))
        assert (err.status, err.field) == (400, key)


def test_msgpack_result_shape_mismatch_via_declared_top_k_is_400() -> None:
    # the arrays hold 2 per position
    err = refusal(decode_result_msgpack, changed(small_result_map(), "top_k", 3))
    assert (err.status, err.field) == (400, "top_k_ids")


@pytest.mark.parametrize("key", ["scored_offsets", "token_logprobs"])
def test_msgpack_result_missing_array_is_400(key: str) -> None:
    err = refusal(decode_result_msgpack, changed(small_result_map(), key))
    assert (err.status, err.field) == (400, key)


@pytest.mark.parametrize(("key", "value"), [("logprob_dtype", "bfloat16"), ("ids_dtype", "u8")])
def test_msgpack_result_unknown_dtype_is_400(key: str, value: str) -> None:
    assert refusal(decode_result_msgpack, changed(small_result_map(), key, value)).status == 400


def test_msgpack_result_wrong_major_version_is_422() -> None:
    obj = changed(small_result_map(), "protocol_version", "2.1")
    err = refusal(decode_result_msgpack, obj)
    assert (err.status, err.field) == (422, "protocol_version")


def test_msgpack_result_undecodable_and_non_map_are_400() -> None:
    for body in (b"\xc1", pack([1, 2]), pack(small_result_map())[:-3]):
        assert refusal(decode_result_msgpack, body).status == 400


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("full", [True, False])
def test_json_result_round_trip(dtype: str, full: bool) -> None:
    rng = np.random.default_rng(21)
    extra = {"top_k": 5, "n_candidates": 3, "entropy": True} if full else {}
    res = random_result(
        rng, [4, 1, 7], model="m/1", temperature=2.0, input_tokens=30, **extra
    ).cast(dtype)
    data = result_to_json_dict(res)
    wire = json.loads(json.dumps(data))
    ScoreResponseJSON.model_validate(wire)  # the dict really follows the published schema
    assert wire["usage"] == {"sequences": 3, "input_tokens": 30, "scored_tokens": 12}
    assert wire["top_k"] == (5 if full else 0)
    assert wire["n_candidates"] == (3 if full else 0)
    assert [len(r["token_logprobs"]) for r in wire["results"]] == [4, 1, 7]
    back = result_from_json_dict(wire)
    assert_result_equal(res, back, float_dtype=dtype)
    if full:
        assert back.top_k_ids_Nk is not None and back.top_k_ids_Nk.dtype == np.int32


def test_json_result_keep_arrays_leaves_numpy_slices() -> None:
    res = random_result(np.random.default_rng(2), [2, 3], top_k=2)
    data = result_to_json_dict(res, keep_arrays=True)
    first = data["results"][1]["token_logprobs"]
    assert isinstance(first, np.ndarray)
    np.testing.assert_array_equal(first, res.token_logprobs_N[2:5])
    np.testing.assert_array_equal(data["results"][0]["top_k_ids"], res.top_k_ids_Nk[:2])


def test_msgpack_result_bytes_per_position_is_small() -> None:
    """top_k=16 + 16 candidates + entropy in float16: about 100 bytes per scored position,
    an order of magnitude below the ~1540 bytes of the JSON encoding."""
    rng = np.random.default_rng(0)
    n_scored = [250, 250, 250, 250]
    res = random_result(rng, n_scored, top_k=16, n_candidates=16, entropy=True, model="t")
    body = encode_result_msgpack(res.cast("float16"))
    per_position = len(body) / 1000
    assert per_position < 1540 / 10
    # 2 (token) + 16*2 (candidates) + 16*2 (ids, uint16) + 16*2 (top-k) + 2 (entropy) = 100
    assert 100 <= per_position < 101
    json_per_position = len(json.dumps(result_to_json_dict(res.cast("float16")))) / 1000
    assert per_position * 5 < json_per_position


# ---- PackedRequest.from_request, subset and PackedResult.concat ------------------------------


def _cands_request(candidate_lists: list[Any]) -> ScoreRequest:
    seqs = []
    for i, cands in enumerate(candidate_lists):
        seq: dict[str, Any] = {"token_ids": [1, 2, 3, 4, 5][: 3 + i], "score_from": 1}
        if cands is not None:
            seq["candidate_ids"] = cands
        seqs.append(seq)
    return ScoreRequest.model_validate({"sequences": seqs})


def test_from_request_candidates_wrong_row_count() -> None:
    # Sequence 1 holds 4 tokens, score_from=1: 3 scored positions, but 2 candidate rows.
    request = _cands_request([[[1, 2], [3, 4]], [[1, 2], [3, 4]]])
    with pytest.raises(ContractError) as info:
        PackedRequest.from_request(request)
    assert info.value.field == "sequences[1].candidate_ids"
    assert info.value.limit == 3
    assert info.value.status == 422


def test_from_request_candidates_ragged_rows() -> None:
    request = _cands_request([[[1, 2], [3, 4]], [[1, 2], [3, 4], [5]]])
    with pytest.raises(ContractError) as info:
        PackedRequest.from_request(request)
    assert info.value.field == "sequences[1].candidate_ids[2]"
    assert info.value.limit == 2
    assert info.value.status == 422


@pytest.mark.parametrize(
    ("cands", "missing"),
    [
        ([[[1], [2]], None, [[1], [2], [3], [4]]], 1),
        ([None, [[1], [2], [3]]], 0),
    ],
)
def test_from_request_candidates_for_some_sequences_only(cands: list[Any], missing: int) -> None:
    with pytest.raises(ContractError) as info:
        PackedRequest.from_request(_cands_request(cands))
    assert info.value.field == f"sequences[{missing}].candidate_ids"
    assert info.value.status == 422


def test_from_request_packs_candidates_in_order() -> None:
    request = _cands_request([[[1, 2], [3, 4]], [[5, 6], [7, 8], [9, 10]]])
    packed = PackedRequest.from_request(request)
    assert packed.candidate_ids_NK is not None
    assert packed.candidate_ids_NK.tolist() == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
    assert packed.scored_offsets_n1.tolist() == [0, 2, 5]
    assert packed.candidates(1).tolist() == [[5, 6], [7, 8], [9, 10]]


def fake_score(req: PackedRequest) -> PackedResult:
    """A deterministic stand-in for the teacher: every number is a function of the inputs at
    that position alone, so scoring a sub-batch must give the same rows as the full batch."""
    targets, contexts = [], []
    for i in range(req.n_sequences):
        toks = req.tokens(i)
        pos = req.scored_positions(i)
        targets.append(toks[pos])
        contexts.append(toks[pos - 1])
    target = np.concatenate(targets).astype(np.int64)
    context = np.concatenate(contexts).astype(np.int64)
    k = req.options.top_k
    cands = req.candidate_ids_NK
    return PackedResult(
        scored_offsets_n1=req.scored_offsets_n1,
        token_logprobs_N=(-(target % 997) / 100.0).astype(np.float32),
        candidate_logprobs_NK=None if cands is None else (-(cands % 991) / 50.0).astype(np.float32),
        top_k_ids_Nk=((context[:, None] * 7 + np.arange(k)) % VOCAB).astype(np.int32),
        top_k_logprobs_Nk=(-np.arange(k, dtype=np.float32) - context[:, None] % 5).astype(
            np.float32
        ),
        entropy_N=(context % 13 / 3.0).astype(np.float32) if req.options.entropy else None,
        model="fake",
        input_tokens=len(req.token_ids_T),
    )


@pytest.mark.parametrize("n_candidates", [0, 3])
@pytest.mark.parametrize("chunk", [1, 3, 5, 100])
def test_subset_and_concat_invert_each_other(n_candidates: int, chunk: int) -> None:
    rng = np.random.default_rng(42 + chunk)
    request = random_score_request(rng, n=11, n_candidates=n_candidates, top_k=4, entropy=True)
    packed = PackedRequest.from_request(request)
    whole = fake_score(packed)
    indices = list(range(packed.n_sequences))
    parts = []
    for start in range(0, len(indices), chunk):
        sub = packed.subset(indices[start : start + chunk])
        assert sub.options == packed.options
        assert sub.n_candidates == packed.n_candidates
        # The sub-request survives the wire, as it would when a client splits a batch.
        sub = decode_request_msgpack(encode_request_msgpack(sub))
        parts.append(fake_score(sub))
    joined = PackedResult.concat(parts)
    assert_result_equal(whole, joined)
    assert joined.n_sequences == packed.n_sequences


def test_subset_reorders_and_keeps_candidates_aligned() -> None:
    rng = np.random.default_rng(8)
    packed = PackedRequest.from_request(random_score_request(rng, n=5, n_candidates=2))
    sub = packed.subset([4, 0, 2])
    assert sub.n_sequences == 3
    for new, old in enumerate([4, 0, 2]):
        np.testing.assert_array_equal(sub.tokens(new), packed.tokens(old))
        assert sub.score_from_n[new] == packed.score_from_n[old]
        np.testing.assert_array_equal(sub.candidates(new), packed.candidates(old))
    np.testing.assert_array_equal(
        sub.seq_offsets_n1, np.concatenate([[0], np.cumsum(packed.seq_lens_n[[4, 0, 2]])])
    )


def test_concat_of_one_part_and_of_nothing() -> None:
    res = random_result(np.random.default_rng(1), [2, 2], top_k=1, input_tokens=8)
    assert_result_equal(res, PackedResult.concat([res]))
    with pytest.raises(ValueError):
        PackedResult.concat([])


def test_concat_drops_an_array_missing_from_any_part() -> None:
    rng = np.random.default_rng(4)
    a = random_result(rng, [2], entropy=True)
    b = random_result(rng, [3], entropy=False)
    joined = PackedResult.concat([a, b])
    assert joined.entropy_N is None
    assert joined.scored_offsets_n1.tolist() == [0, 2, 5]
    np.testing.assert_array_equal(
        joined.token_logprobs_N, np.concatenate([a.token_logprobs_N, b.token_logprobs_N])
    )


# ---- scored spans (protocol 1.3) -------------------------------------------------------------


def random_spans(rng: np.random.Generator, length: int) -> list[tuple[int, int]]:
    """1..4 sorted, non-overlapping (sometimes touching) [start, end) spans in [1, length]."""
    cuts = np.sort(rng.choice(np.arange(1, length + 1), size=min(length, 8), replace=False))
    pairs = [(int(a), int(b)) for a, b in zip(cuts[::2], cuts[1::2], strict=False)]
    return pairs[: int(rng.integers(1, 5))] or [(length - 1, length)]


def random_spans_request(
    rng: np.random.Generator, n: int, n_candidates: int = 0, **options: Any
) -> ScoreRequest:
    sequences = []
    for _ in range(n):
        length = int(rng.integers(2, 41))
        spans = random_spans(rng, length)
        n_scored = sum(b - a for a, b in spans)
        seq: dict[str, Any] = {
            "token_ids": rng.integers(0, VOCAB, size=length).tolist(),
            "score_spans": [list(p) for p in spans],
        }
        if n_candidates:
            seq["candidate_ids"] = rng.integers(0, VOCAB, (n_scored, n_candidates)).tolist()
        sequences.append(seq)
    return ScoreRequest.model_validate({"sequences": sequences, **options}, strict=True)


def spans_request_map() -> dict[str, Any]:
    req = PackedRequest.from_arrays(
        [[1, 2, 3, 4, 5, 6], [7, 8, 9]],
        None,
        None,
        ScoreOptions(),
        spans=[[(1, 2), (4, 6)], [(2, 3)]],
    )
    return unpack(encode_request_msgpack(req))


def test_spans_pack_their_positions_in_order() -> None:
    req = PackedRequest.from_arrays(
        [np.arange(10), np.arange(6), np.arange(4)],
        None,
        [np.zeros((5, 2)), np.ones((1, 2)), np.full((3, 2), 2)],
        spans=[[(1, 3), (5, 6), (8, 10)], [(5, 6)], [(1, 4)]],
    )
    assert req.has_spans
    assert req.score_from_n.tolist() == [1, 5, 1]
    assert req.n_scored_n.tolist() == [5, 1, 3]
    assert req.scored_offsets_n1.tolist() == [0, 5, 6, 9]
    assert req.scored_positions(0).tolist() == [1, 2, 5, 8, 9]
    assert req.scored_positions(1).tolist() == [5]
    assert req.scored_positions(2).tolist() == [1, 2, 3]
    assert req.scored_positions(0).dtype == np.int64
    assert req.spans(0).tolist() == [[1, 3], [5, 6], [8, 10]]
    assert req.candidates(1).tolist() == [[1, 1]]
    plain = PackedRequest.from_arrays([np.arange(10)], [7])
    assert not plain.has_spans and plain.span_offsets_n1 is None
    assert plain.scored_positions(0).tolist() == [7, 8, 9]
    assert plain.spans(0).tolist() == [[7, 10]]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_candidates", [0, 3])
def test_msgpack_request_round_trip_with_spans(seed: int, n_candidates: int) -> None:
    rng = np.random.default_rng(300 + seed)
    request = random_spans_request(rng, int(rng.integers(1, 9)), n_candidates, top_k=2)
    packed = PackedRequest.from_request(request)
    body = encode_request_msgpack(packed)
    obj = unpack(body)
    np.testing.assert_array_equal(np.frombuffer(obj["span_offsets"], "<i8"), packed.span_offsets_n1)
    np.testing.assert_array_equal(np.frombuffer(obj["spans"], "<i4"), packed.spans_S2.reshape(-1))
    np.testing.assert_array_equal(  # score_from is still sent: each sequence's first start
        np.frombuffer(obj["score_from"], "<i4"), [s.score_spans[0][0] for s in request.sequences]
    )
    decoded = decode_request_msgpack(body)
    assert_packed_request_equal(packed, decoded)
    validate_request(decoded, Limits(), VOCAB)
    for i, seq in enumerate(request.sequences):
        want = [p for a, b in seq.score_spans for p in range(a, b)]
        assert decoded.scored_positions(i).tolist() == want
        if n_candidates:
            assert decoded.candidates(i).tolist() == seq.candidate_ids


def test_json_request_with_spans_matches_from_request() -> None:
    rng = np.random.default_rng(310)
    request = random_spans_request(rng, 6, 2, top_k=3)
    decoded = decode_request_json(request.model_dump_json(exclude_none=True).encode())
    assert_packed_request_equal(PackedRequest.from_request(request), decoded)


def test_old_client_bytes_decode_as_before() -> None:
    """A request without spans (a 1.2 client's bytes) carries no span keys and decodes to a
    request without spans, scored from score_from as before."""
    obj = small_request_map()
    assert "span_offsets" not in obj and "spans" not in obj
    obj["protocol_version"] = "1.2"
    decoded = decode_request_msgpack(pack(obj))
    assert not decoded.has_spans
    assert decoded.scored_positions(0).tolist() == [2, 3]
    assert decoded.n_scored_n.tolist() == [2, 2]
    nil_spans = decode_request_msgpack(pack({**obj, "span_offsets": None, "spans": None}))
    assert not nil_spans.has_spans


def test_score_from_is_one_span_in_the_packed_form() -> None:
    seqs = [np.arange(9), np.arange(4)]
    tail = PackedRequest.from_arrays(seqs, [3, 1])
    spans = PackedRequest.from_arrays(seqs, None, spans=[[(3, 9)], [(1, 4)]])
    np.testing.assert_array_equal(tail.score_from_n, spans.score_from_n)
    np.testing.assert_array_equal(tail.scored_offsets_n1, spans.scored_offsets_n1)
    for i in range(2):
        np.testing.assert_array_equal(tail.scored_positions(i), spans.scored_positions(i))


@pytest.mark.parametrize(
    ("change", "field", "limit"),
    [
        ({"spans": None}, "spans", None),
        ({"span_offsets": None}, "span_offsets", None),
        ({"spans": np.array([1, 2, 4], "<i4").tobytes()}, "spans", 2),
        ({"spans": [1, 2]}, "spans", None),
    ],
)
def test_msgpack_request_malformed_spans_are_refused(
    change: dict[str, Any], field: str, limit: Any
) -> None:
    err = refusal(decode_request_msgpack, {**spans_request_map(), **change})
    assert err.field == field
    if limit is not None:
        assert err.limit == limit


def test_msgpack_request_spans_bin_of_wrong_byte_count_is_400() -> None:
    err = refusal(decode_request_msgpack, {**spans_request_map(), "spans": b"\x01\x02\x03"})
    assert (err.status, err.field) == (400, "spans")


def test_from_request_spans_need_exactly_one_form() -> None:
    both = ScoreRequest(
        sequences=[SequenceIn(token_ids=[1, 2, 3], score_from=1, score_spans=[(1, 2)])]
    )
    with pytest.raises(ContractError) as info:
        PackedRequest.from_request(both)
    assert info.value.field == "sequences[0].score_spans"
    neither = ScoreRequest(sequences=[SequenceIn(token_ids=[1, 2, 3])])
    with pytest.raises(ContractError) as info:
        PackedRequest.from_request(neither)
    assert info.value.field == "sequences[0].score_from"


def test_from_request_mixes_score_from_and_spans_per_sequence() -> None:
    request = ScoreRequest(
        sequences=[
            SequenceIn(token_ids=[1, 2, 3, 4], score_from=2, candidate_ids=[[1], [2]]),
            SequenceIn(
                token_ids=[5, 6, 7, 8, 9],
                score_spans=[(1, 2), (3, 5)],
                candidate_ids=[[3], [4], [5]],
            ),
        ]
    )
    packed = PackedRequest.from_request(request)
    assert packed.spans_S2.tolist() == [[2, 4], [1, 2], [3, 5]]
    assert packed.span_offsets_n1.tolist() == [0, 1, 3]
    assert packed.score_from_n.tolist() == [2, 1]
    assert packed.candidate_ids_NK.tolist() == [[1], [2], [3], [4], [5]]
    validate_request(packed, Limits(), VOCAB)


def test_from_request_candidate_rows_count_span_positions() -> None:
    request = ScoreRequest(
        sequences=[
            SequenceIn(token_ids=[1] * 8, score_spans=[(1, 3), (6, 8)], candidate_ids=[[1]] * 3)
        ]
    )
    with pytest.raises(ContractError) as info:
        PackedRequest.from_request(request)
    assert info.value.field == "sequences[0].candidate_ids"
    assert info.value.limit == 4


@pytest.mark.parametrize("n_candidates", [0, 3])
@pytest.mark.parametrize("chunk", [1, 2, 100])
def test_subset_and_concat_carry_spans(n_candidates: int, chunk: int) -> None:
    rng = np.random.default_rng(320 + chunk)
    request = random_spans_request(rng, 9, n_candidates, top_k=4, entropy=True)
    packed = PackedRequest.from_request(request)
    whole = fake_score(packed)
    parts = []
    for start in range(0, packed.n_sequences, chunk):
        indices = list(range(start, min(start + chunk, packed.n_sequences)))
        sub = decode_request_msgpack(encode_request_msgpack(packed.subset(indices)))
        for new, old in enumerate(indices):
            np.testing.assert_array_equal(sub.spans(new), packed.spans(old))
            np.testing.assert_array_equal(sub.scored_positions(new), packed.scored_positions(old))
        validate_request(sub, Limits(), VOCAB)
        parts.append(fake_score(sub))
    assert_result_equal(whole, PackedResult.concat(parts))
    reordered = packed.subset([2, 0])
    np.testing.assert_array_equal(reordered.spans(0), packed.spans(2))
    np.testing.assert_array_equal(reordered.candidates(1), packed.candidates(0))
