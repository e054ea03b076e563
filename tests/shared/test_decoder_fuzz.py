"""Property-based fuzzing of the request decoders and validators, in process (hypothesis).

Whatever bytes arrive, decoding + validation either yields a servable request or raises
ContractError with a 4xx status and a field; never any other exception (which the server
would answer with a 500). Thousands of cases run in seconds because no HTTP is involved;
tests/server/test_fuzz.py sends the same mutations to a real server.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opd.shared.codec import (
    decode_request_json,
    decode_request_msgpack,
    decode_result_msgpack,
    encode_result_msgpack,
    json_object,
    validate_wire,
)
from opd.shared.errors import ContractError
from opd.shared.limits import Limits
from opd.shared.packed import PackedResult
from opd.shared.schemas import GenerateRequest
from opd.shared.validation import validate_generate, validate_request
from tests.support import fuzz

VOCAB = 49_152
LIMITS = Limits(max_sequences=4, max_tokens_per_sequence=128, max_total_tokens=256, max_top_k=8)
FAST = settings(
    max_examples=fuzz.examples(400),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)


def _decoded_or_refused(decode, body: bytes) -> None:
    try:
        req = decode(body)
        validate_request(req, LIMITS, VOCAB)
    except ContractError as err:
        assert err.status in (400, 413, 415, 422), err.status
        assert err.field, err.message  # every refusal names what to fix
        assert err.message and not err.message.startswith("None")


@FAST
@given(fuzz.mutated_json("/v1/score"))
def test_score_json_structural(body):
    _decoded_or_refused(decode_request_json, body)


@FAST
@given(st.data())
def test_score_json_bytes(data):
    body = data.draw(fuzz.mutated_bytes(fuzz.valid_json("/v1/score")))
    _decoded_or_refused(decode_request_json, body)


@FAST
@given(fuzz.mutated_msgpack())
def test_score_msgpack_fields(body):
    _decoded_or_refused(decode_request_msgpack, body)


@FAST
@given(st.data())
def test_score_msgpack_bytes(data):
    valid = msgpack.packb(fuzz.valid_msgpack_score(), use_bin_type=True)
    _decoded_or_refused(decode_request_msgpack, data.draw(fuzz.mutated_bytes(valid)))


@FAST
@given(fuzz.mutated_json("/v1/generate"))
def test_generate_json_structural(body):
    try:
        req = validate_wire(GenerateRequest, json_object(body))
        validate_generate(req, req.prompt_token_ids or [[1]], LIMITS, VOCAB, "prompt_token_ids")
    except ContractError as err:
        assert err.status in (400, 422) and err.field, err.message


def _result() -> bytes:
    rows = np.array([0, 3, 5], dtype=np.int64)
    res = PackedResult(
        scored_offsets_n1=rows,
        token_logprobs_N=np.linspace(-3, 0, 5, dtype=np.float32),
        candidate_logprobs_NK=None,
        top_k_ids_Nk=np.arange(10, dtype=np.int32).reshape(5, 2),
        top_k_logprobs_Nk=np.full((5, 2), -1.0, np.float32),
        entropy_N=None,
        token_ranks_N=None,
        model="m",
        temperature=1.0,
        logprob_dtype="float32",
        input_tokens=9,
    )
    return encode_result_msgpack(res)


@FAST
@given(st.data())
def test_client_reads_a_corrupt_answer_as_a_contract_error(data):
    """The client side too: a corrupt answer is a ContractError, never an IndexError."""
    try:
        decode_result_msgpack(data.draw(fuzz.mutated_bytes(_result())))
    except ContractError as err:
        # 400 for bytes that do not decode; 422 for a well-formed answer of another protocol
        # major (a flipped digit of protocol_version), as the server answers such a request
        assert err.status in (400, 422)


@pytest.mark.parametrize(
    "body",
    [b"[" * 50_000 + b"]" * 50_000, b'{"top_k": ' + b"9" * 5000 + b"}", b"null", b"[]", b'"x"'],
    ids=["deep", "5000-digit-int", "null", "array", "string"],
)
def test_known_hostile_bodies_are_400_naming_the_body(body):
    with pytest.raises(ContractError) as info:
        decode_request_json(body)
    assert info.value.status == 400 and info.value.field == "body"
