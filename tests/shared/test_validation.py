"""validate_request: one test per rule, each naming the exact field and the limit it reports."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from opd.shared.codec import decode_request_json, decode_request_msgpack, encode_request_msgpack
from opd.shared.errors import ContractError
from opd.shared.limits import Limits
from opd.shared.packed import PackedRequest
from opd.shared.schemas import ScoreOptions
from opd.shared.validation import validate_request

VOCAB = 100
LIMITS = Limits(
    max_sequences=4,
    max_tokens_per_sequence=16,
    max_total_tokens=40,
    max_top_k=8,
    max_candidates=4,
    min_temperature=0.01,
    max_temperature=10.0,
)


def make(
    lengths: Sequence[int] = (5, 6, 7),
    score_from: Sequence[int] | None = None,
    n_candidates: int = 0,
    **options: Any,
) -> PackedRequest:
    """Valid sequences of the given lengths (token ids 1..), score_from 1 unless given."""
    seqs = [np.arange(1, n + 1) % VOCAB for n in lengths]
    sf = list(score_from) if score_from is not None else [1] * len(lengths)
    cands = None
    if n_candidates:
        cands = [
            (np.arange(max(n - s, 0) * n_candidates) % VOCAB).reshape(-1, n_candidates)
            for n, s in zip(lengths, sf, strict=True)
        ]
    return PackedRequest.from_arrays(seqs, sf, cands, ScoreOptions(**options))


def refused(req: PackedRequest, limits: Limits = LIMITS, vocab: int = VOCAB) -> ContractError:
    with pytest.raises(ContractError) as info:
        validate_request(req, limits, vocab)
    err = info.value
    assert err.status == 422
    assert err.kind == "validation_error"
    assert err.message
    return err


# ---- valid requests --------------------------------------------------------------------------


def test_valid_request_passes() -> None:
    assert validate_request(make(), LIMITS, VOCAB) is None


def test_request_at_every_limit_passes() -> None:
    # 4 sequences (max), one of 16 tokens (max per sequence), 40 tokens in total (max),
    # top_k = max_top_k, 4 candidates (max), ids 0 and vocab - 1, temperature at both bounds.
    req = make((16, 8, 8, 8), score_from=(15, 1, 7, 4), n_candidates=4, top_k=8, entropy=True)
    req.token_ids_T[0] = 0
    req.token_ids_T[-1] = VOCAB - 1
    assert req.candidate_ids_NK is not None
    req.candidate_ids_NK[0, 0] = VOCAB - 1
    assert len(req.token_ids_T) == LIMITS.max_total_tokens
    validate_request(req, LIMITS, VOCAB)
    for temperature in (LIMITS.min_temperature, LIMITS.max_temperature):
        validate_request(make(temperature=temperature), LIMITS, VOCAB)


def test_valid_request_passes_after_the_wire() -> None:
    req = make((3, 9), score_from=(2, 4), n_candidates=2, top_k=3)
    validate_request(decode_request_msgpack(encode_request_msgpack(req)), LIMITS, VOCAB)


def test_default_limits_accept_a_normal_request() -> None:
    validate_request(make((100, 2000), n_candidates=64, top_k=64), Limits(), 49_152)


# ---- sequences -------------------------------------------------------------------------------


def test_too_many_sequences() -> None:
    err = refused(make((3, 3, 3, 3, 3)))
    assert err.field == "sequences"
    assert err.limit == LIMITS.max_sequences == 4


def test_no_sequence() -> None:
    empty = PackedRequest(
        token_ids_T=np.zeros(0, dtype=np.int32),
        seq_offsets_n1=np.zeros(1, dtype=np.int64),
        score_from_n=np.zeros(0, dtype=np.int64),
    )
    err = refused(empty)
    assert err.field == "sequences"
    assert err.limit == 1


@pytest.mark.parametrize("length", [0, 1])
def test_sequence_shorter_than_two_tokens(length: int) -> None:
    err = refused(make((5, 6, length), score_from=(1, 1, 1)))
    assert err.field == "sequences[2].token_ids"
    assert err.limit == 2


def test_too_many_tokens_in_one_sequence() -> None:
    err = refused(make((5, 17, 3)))
    assert err.field == "sequences[1].token_ids"
    assert err.limit == LIMITS.max_tokens_per_sequence == 16


def test_too_many_tokens_in_total() -> None:
    err = refused(make((14, 14, 13)))  # 41 > 40, each under 16
    assert err.field == "sequences"
    assert err.limit == LIMITS.max_total_tokens == 40


def test_first_broken_sequence_is_named() -> None:
    err = refused(make((5, 20, 3, 30)))
    assert err.field == "sequences[1].token_ids"


# ---- token ids -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, -(2**31), VOCAB, VOCAB + 1, 2**31 - 1])
def test_token_id_out_of_vocabulary(bad: int) -> None:
    req = make((5, 6, 7))
    req.token_ids_T[5 + 6 + 5] = bad  # sequence 2, position 5
    err = refused(req)
    assert err.field == "sequences[2].token_ids[5]"
    assert err.limit == VOCAB
    assert str(bad) in err.message


def test_token_id_out_of_vocabulary_first_position() -> None:
    req = make((5, 6))
    req.token_ids_T[5] = VOCAB  # sequence 1, position 0 (on an offset boundary)
    err = refused(req)
    assert err.field == "sequences[1].token_ids[0]"


def test_token_id_from_json_body_names_its_position() -> None:
    body = {
        "sequences": [
            {"token_ids": [1, 2, 3], "score_from": 1},
            {"token_ids": [4, 5, 6, 7, 8, 9], "score_from": 2},
            {"token_ids": [1, 2, 3, 4, 5, 6, 7], "score_from": 3},
        ]
    }
    body["sequences"][2]["token_ids"][5] = -3
    err = refused(decode_request_json(json.dumps(body).encode()))
    assert err.field == "sequences[2].token_ids[5]"
    assert err.limit == VOCAB


# ---- score_from ------------------------------------------------------------------------------


@pytest.mark.parametrize("score_from", [0, -1, 6, 7, 1000])
def test_score_from_out_of_range(score_from: int) -> None:
    err = refused(make((5, 6, 7), score_from=(1, score_from, 2)))
    assert err.field == "sequences[1].score_from"
    assert err.limit == 5  # len(token_ids) - 1
    assert str(score_from) in err.message


def test_score_from_last_token_is_valid() -> None:
    validate_request(make((5, 6, 7), score_from=(4, 5, 6)), LIMITS, VOCAB)


def test_score_from_wrong_count() -> None:
    req = make((5, 6, 7))
    req.score_from_n = req.score_from_n[:2]
    err = refused(req)
    assert err.field == "score_from"
    assert err.limit == 3


# ---- seq_offsets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offsets",
    [
        [1, 5, 11, 18],  # does not start at 0
        [0, 6, 5, 18],  # decreases
        [0, 5, 11, 17],  # ends before len(token_ids)
        [0, 5, 11, 19],  # ends after len(token_ids)
    ],
)
def test_bad_seq_offsets(offsets: list[int]) -> None:
    req = make((5, 6, 7))
    req.seq_offsets_n1 = np.array(offsets, dtype=np.int64)
    err = refused(req)
    assert err.field == "seq_offsets"


# ---- options ---------------------------------------------------------------------------------


def test_top_k_above_max_top_k() -> None:
    err = refused(make(top_k=9))
    assert err.field == "top_k"
    assert err.limit == LIMITS.max_top_k == 8
    assert "max_top_k=8" in err.message  # the drop-in routes pass the message on as it is


def test_top_k_above_vocab() -> None:
    req = make((3, 4), top_k=7)
    err = refused(req, vocab=6)
    assert err.field == "top_k"
    assert err.limit == 6
    assert "vocabulary" in err.message
    validate_request(make((3, 4), top_k=6), LIMITS, 6)


def test_top_k_zero_when_max_top_k_is_zero() -> None:
    limits = LIMITS.model_copy(update={"max_top_k": 0})
    validate_request(make(top_k=0), limits, VOCAB)
    assert refused(make(top_k=1), limits=limits).limit == 0


@pytest.mark.parametrize("temperature", [10.5, 1e6])
def test_temperature_above_max(temperature: float) -> None:
    err = refused(make(temperature=temperature))
    assert err.field == "temperature"
    assert err.limit == LIMITS.max_temperature


@pytest.mark.parametrize("temperature", [0.009, 1e-9])
def test_temperature_below_min(temperature: float) -> None:
    err = refused(make(temperature=temperature))
    assert err.field == "temperature"
    assert str(LIMITS.min_temperature) in err.message


# BUG (shared/validation.py, _validate_options, the temperature check): a temperature *below*
# min_temperature reports limit=max_temperature, so the error body names the wrong bound
# ("limit": 10.0 for temperature=0.001 when the broken bound is 0.01). ErrorDetail.limit is
# documented as "the limit that was exceeded". This test fails until the lower bound is reported.
def test_BUG_temperature_below_min_reports_min_temperature_as_limit() -> None:
    err = refused(make(temperature=0.001))
    assert err.field == "temperature"
    assert err.limit == LIMITS.min_temperature


# ---- candidates ------------------------------------------------------------------------------


def test_too_many_candidates() -> None:
    err = refused(make(n_candidates=5))
    assert err.field == "candidate_ids"
    assert err.limit == LIMITS.max_candidates == 4


def test_zero_candidates_per_position() -> None:
    req = make((3, 4))
    req.candidate_ids_NK = np.zeros((5, 0), dtype=np.int32)
    err = refused(req)
    assert err.field == "candidate_ids"
    assert err.limit == LIMITS.max_candidates


def test_candidates_when_max_candidates_is_zero() -> None:
    limits = LIMITS.model_copy(update={"max_candidates": 0})
    err = refused(make(n_candidates=1), limits=limits)
    assert err.field == "candidate_ids"
    assert err.limit == 0


@pytest.mark.parametrize("rows", [8, 10, 0])
def test_candidate_matrix_with_wrong_row_count(rows: int) -> None:
    req = make((3, 4, 5))  # 2 + 3 + 4 = 9 scored positions
    req.candidate_ids_NK = np.ones((rows, 2), dtype=np.int32)
    err = refused(req)
    assert err.field == "candidate_ids"
    assert err.limit == 9


def test_candidate_matrix_not_two_dimensional() -> None:
    req = make((3, 4, 5))
    req.candidate_ids_NK = np.ones(9, dtype=np.int32)
    err = refused(req)
    assert err.field == "candidate_ids"


@pytest.mark.parametrize("bad", [-1, VOCAB, 2**31 - 1])
def test_candidate_id_out_of_vocabulary(bad: int) -> None:
    req = make((5, 6, 7), score_from=(1, 2, 3), n_candidates=4)  # 4 + 4 + 4 scored rows
    assert req.candidate_ids_NK is not None
    req.candidate_ids_NK[4 + 2, 3] = bad  # sequence 1, its row 2, column 3
    err = refused(req)
    assert err.field == "sequences[1].candidate_ids[2][3]"
    assert err.limit == VOCAB


def test_candidate_id_out_of_vocabulary_in_first_and_last_rows() -> None:
    req = make((5, 6), score_from=(1, 1), n_candidates=2)
    assert req.candidate_ids_NK is not None
    req.candidate_ids_NK[-1, 1] = VOCAB
    assert refused(req).field == "sequences[1].candidate_ids[4][1]"
    req.candidate_ids_NK[0, 0] = -5
    assert refused(req).field == "sequences[0].candidate_ids[0][0]"


# ---- order of rules --------------------------------------------------------------------------


def test_sequence_count_is_checked_before_tokens() -> None:
    req = make((1, 3, 3, 3, 3))
    req.token_ids_T[:] = -1
    assert refused(req).field == "sequences"


def test_lengths_are_checked_before_token_ids() -> None:
    req = make((3, 20))
    req.token_ids_T[0] = -1
    assert refused(req).field == "sequences[1].token_ids"


def test_error_detail_carries_field_and_limit() -> None:
    err = refused(make((5, 17)))
    detail = err.detail(request_id="abc")
    assert detail.type == "validation_error"
    assert detail.field == "sequences[1].token_ids"
    assert detail.limit == 16
    assert detail.request_id == "abc"
    assert detail.message == err.message


# ---- score_spans (protocol 1.3) --------------------------------------------------------------


def spans_req(spans: list[list[tuple[int, int]]], lengths: Sequence[int] = (8, 6), k: int = 0):
    """Valid-token sequences of `lengths` scored at `spans`; k candidates per scored position."""
    seqs = [np.arange(1, n + 1) % VOCAB for n in lengths]
    cands = None
    if k:
        cands = [np.ones((sum(max(b - a, 0) for a, b in sp), k), np.int64) for sp in spans]
    return PackedRequest.from_arrays(seqs, None, cands, spans=spans)


def test_spans_at_the_edges_pass() -> None:
    # a span at position 1, touching spans, one-token spans, a span ending at L
    req = spans_req([[(1, 2), (2, 3), (5, 6), (7, 8)], [(5, 6)]], k=2)
    validate_request(req, LIMITS, VOCAB)
    assert req.n_scored_n.tolist() == [4, 1]


@pytest.mark.parametrize(
    ("spans", "field", "limit"),
    [
        ([[(1, 4), (3, 6)], [(1, 2)]], "sequences[0].score_spans[1]", 4),  # overlapping
        ([[(5, 6), (1, 3)], [(1, 2)]], "sequences[0].score_spans[1]", 6),  # unsorted
        ([[(1, 2)], [(3, 3)]], "sequences[1].score_spans[0]", 4),  # empty
        ([[(1, 2)], [(4, 2)]], "sequences[1].score_spans[0]", 5),  # end before start
        ([[(0, 2)], [(1, 2)]], "sequences[0].score_spans[0]", 1),  # starts at 0
        ([[(-3, 2)], [(1, 2)]], "sequences[0].score_spans[0]", 1),
        ([[(1, 2), (7, 9)], [(1, 2)]], "sequences[0].score_spans[1]", 8),  # past the end
        ([[(1, 2)], []], "sequences[1].score_spans", 1),  # no span
    ],
)
def test_bad_spans_name_the_span_and_the_limit(spans, field: str, limit: int) -> None:
    err = refused(spans_req(spans))
    assert err.field == field
    assert err.limit == limit
    assert str(limit) in err.message


def test_the_first_broken_span_is_named() -> None:
    err = refused(spans_req([[(1, 2), (2, 3)], [(1, 9), (0, 1)]]))
    assert err.field == "sequences[1].score_spans[0]"
    assert err.limit == 6


def test_spans_score_from_must_be_the_first_start() -> None:
    req = spans_req([[(2, 4)], [(3, 5)]])
    req.score_from_n = np.array([2, 1], dtype=np.int64)
    err = refused(req)
    assert err.field == "sequences[1].score_from"
    assert err.limit == 3


def test_span_candidates_count_scored_positions() -> None:
    req = spans_req([[(1, 3), (5, 8)], [(2, 3)]], k=2)
    assert req.candidate_ids_NK is not None and req.candidate_ids_NK.shape == (6, 2)
    validate_request(req, LIMITS, VOCAB)
    req.candidate_ids_NK = req.candidate_ids_NK[:5]
    err = refused(req)
    assert err.field == "candidate_ids"
    assert err.limit == 6


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: setattr(r, "spans_S2", None), "spans"),
        (lambda r: setattr(r, "span_offsets_n1", None), "span_offsets"),
        (lambda r: setattr(r, "span_offsets_n1", np.array([0, 1], np.int64)), "span_offsets"),
        (lambda r: setattr(r, "span_offsets_n1", np.array([0, 2, 1], np.int64)), "span_offsets"),
        (lambda r: setattr(r, "span_offsets_n1", np.array([1, 1, 2], np.int64)), "span_offsets"),
        (lambda r: setattr(r, "spans_S2", np.zeros((2, 3), np.int64)), "spans"),
    ],
)
def test_malformed_span_arrays(mutate, field: str) -> None:
    req = spans_req([[(1, 2)], [(1, 2)]])
    mutate(req)
    assert refused(req).field == field


def test_spans_survive_the_wire_and_keep_their_errors() -> None:
    req = spans_req([[(1, 3), (2, 4)], [(1, 2)]])
    err = refused(decode_request_msgpack(encode_request_msgpack(req)))
    assert err.field == "sequences[0].score_spans[1]"
    body = {"sequences": [{"token_ids": [1, 2, 3, 4], "score_spans": [[1, 2], [5, 6]]}]}
    err = refused(decode_request_json(json.dumps(body).encode()))
    assert (err.field, err.limit) == ("sequences[0].score_spans[1]", 4)
