"""Numbers from a real server process equal an independent float64 computation.

Sequences of random lengths and options are sent concurrently by several clients so that the
batcher packs them together (and with each other's different options); each result must still
match the reference computed from that sequence alone.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from opd.client import TeacherClient
from opd.shared.codec import result_from_json_dict
from opd.shared.packed import ROW_ARRAYS, PackedRequest
from opd.shared.schemas import ScoreOptions
from tests.support.reference import ReferenceModel, assert_matches, chat_batch, span_positions


def _random_batch(rng: np.random.Generator, n: int, vocab: int, max_len: int, k: int):
    seqs, score_from, cands = [], [], []
    for _ in range(n):
        length = int(rng.integers(2, max_len))
        seqs.append(rng.integers(0, vocab, length))
        sf = int(rng.integers(1, length))
        score_from.append(sf)
        cands.append(rng.integers(0, vocab, (length - sf, k)))
    return seqs, score_from, cands


OPTION_SETS = [
    ScoreOptions(top_k=16, entropy=True),
    ScoreOptions(top_k=5, entropy=False, temperature=0.7),
    ScoreOptions(top_k=0, entropy=True, temperature=1.5),
]


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_tiny_model_matches_float64_reference(tiny_server, tiny_model_dir, encoding):
    rng = np.random.default_rng(1234)
    ref_model = ReferenceModel(tiny_model_dir)
    vocab = ref_model.model.config.vocab_size
    jobs = []
    for i, options in enumerate(OPTION_SETS * 2):
        k = 16 if i % 2 == 0 else 3
        seqs, sf, cands = _random_batch(rng, 6, vocab, 160, k)
        jobs.append((PackedRequest.from_arrays(seqs, sf, cands, options), seqs, sf, cands))

    # Concurrent requests with different options land in shared forward passes.
    with TeacherClient(tiny_server, encoding=encoding) as client, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: client.score(job[0]), jobs))

    for (req, seqs, sf, cands), result in zip(jobs, results, strict=True):
        assert result.n_sequences == len(seqs)
        for i, scores in enumerate(result.sequences()):
            ref = ref_model.reference(seqs[i], sf[i], req.options.temperature)
            assert_matches(scores, ref, seqs[i], sf[i], cands[i], req.options.top_k, atol=1e-4)
            assert (scores.entropy is not None) == req.options.entropy


def test_float16_responses_are_float16_and_close(tiny_server, tiny_model_dir):
    rng = np.random.default_rng(7)
    ref_model = ReferenceModel(tiny_model_dir)
    seqs, sf, cands = _random_batch(rng, 4, ref_model.model.config.vocab_size, 64, 8)
    options = ScoreOptions(top_k=8, entropy=True, logprob_dtype="float16")
    with TeacherClient(tiny_server) as client:
        result = client.score(PackedRequest.from_arrays(seqs, sf, cands, options))
    assert result.logprob_dtype == "float16"
    assert result.token_logprobs_N.dtype == np.float16
    for i, scores in enumerate(result.sequences()):
        ref = ref_model.reference(seqs[i], sf[i])
        # float16 keeps ~3 significant digits: compare relative to the magnitude
        lp = scores.candidate_logprobs.astype(np.float64)
        np.testing.assert_allclose(lp, ref.at(cands[i]), rtol=2e-3, atol=2e-3)


def test_real_smollm2_matches_float64_reference(smol_server, smollm2_dir):
    """The real embedded teacher, prompt + completion from its own chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ref_model = ReferenceModel(smollm2_dir)
    rng = np.random.default_rng(0)
    prompts = ["What is 2 + 2?", "Name a colour.", "Write a haiku about rain."]
    answers = ["2 + 2 equals 4.", "Blue is a colour.", "Soft rain on the roof, quiet night."]
    # plus one fully random sequence (scored from position 1)
    seqs, sf, cands = chat_batch(tokenizer, zip(prompts, answers, strict=True), rng, 40)
    options = ScoreOptions(top_k=16, entropy=True)
    with TeacherClient(smol_server) as client:
        result = client.score(PackedRequest.from_arrays(seqs, sf, cands, options))
    for i, scores in enumerate(result.sequences()):
        ref = ref_model.reference(seqs[i], sf[i])
        assert_matches(scores, ref, seqs[i], sf[i], cands[i], 16, atol=1e-4)


def test_batch_invariance_alone_vs_packed_with_others(coalescing_server):
    """One sequence scored alone equals the same sequence packed with others of different
    lengths and options (the coalescing server waits 300 ms, so concurrent requests share a
    forward pass)."""
    rng = np.random.default_rng(99)
    target = rng.integers(0, 49152, 37)
    cands = rng.integers(0, 49152, (27, 16))
    options = ScoreOptions(top_k=16, entropy=True)
    alone_req = PackedRequest.from_arrays([target], [10], [cands], options)
    with TeacherClient(coalescing_server, max_retries=30) as client:
        alone = client.score(alone_req).sequence(0)
        others = [
            PackedRequest.from_arrays([rng.integers(0, 49152, n)], [1], None, ScoreOptions(top_k=3))
            for n in (5, 9, 12)
        ]
        mixed = PackedRequest.from_arrays(
            [rng.integers(0, 49152, 3), target, rng.integers(0, 49152, 11)],
            [1, 10, 2],
            [rng.integers(0, 49152, (2, 16)), cands, rng.integers(0, 49152, (9, 16))],
            options,
        )
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client.score, r) for r in [mixed, *others]]
            packed = futures[0].result().sequence(1)
            for f in futures[1:]:
                f.result()
    for name in ("token_logprobs", "candidate_logprobs", "top_k_logprobs", "entropy"):
        np.testing.assert_allclose(getattr(alone, name), getattr(packed, name), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(alone.top_k_ids[:, :5], packed.top_k_ids[:, :5])


def test_bfloat16_teacher_is_close_to_the_float32_reference(tiny_model_dir, tmp_path):
    """--dtype bfloat16 really runs in bfloat16 (reported, and not bit-identical to float32),
    while staying close to the float32 reference."""
    from opd.client.teacher.launch import LocalTeacher

    rng = np.random.default_rng(5)
    ref_model = ReferenceModel(tiny_model_dir)
    seqs, sf, cands = _random_batch(rng, 3, ref_model.model.config.vocab_size, 48, 4)
    options = ScoreOptions(top_k=4, entropy=True)
    teacher = LocalTeacher(
        str(tiny_model_dir), log_path=tmp_path / "bf16.log", extra_args=["--dtype", "bfloat16"]
    )
    with teacher as url, TeacherClient(url) as client:
        assert client.connect().dtype == "bfloat16"
        result = client.score(PackedRequest.from_arrays(seqs, sf, cands, options))
    max_err = 0.0
    for i, scores in enumerate(result.sequences()):
        ref = ref_model.reference(seqs[i], sf[i])
        err = np.abs(scores.candidate_logprobs - ref.at(cands[i])).max()
        max_err = max(max_err, float(err))
    assert 0 < max_err < 0.5, max_err


# ---- scored spans (protocol 1.3) --------------------------------------------------------------


def _span_layouts(rng: np.random.Generator, vocab: int):
    """Sequences with their scored spans: two multi-turn-shaped ones sharing a 20-token context
    (the HF backend runs it once: a shared-context group keyed on the first scored position),
    gaps between spans, a span at position 1, spans ending at L, touching and one-token spans;
    1 to 4 spans per sequence."""
    shared = rng.integers(0, vocab, 20)
    layouts = [
        (np.concatenate([shared, rng.integers(0, vocab, 40)]), [(20, 30), (41, 52)]),
        (np.concatenate([shared, rng.integers(0, vocab, 28)]), [(20, 25), (33, 48)]),
        (rng.integers(0, vocab, 30), [(1, 2), (2, 3), (10, 11), (29, 30)]),
        (rng.integers(0, vocab, 5), [(1, 5)]),
        (rng.integers(0, vocab, 40), [(39, 40)]),
        (rng.integers(0, vocab, 50), [(7, 8), (12, 13), (20, 21)]),
    ]
    return [s for s, _ in layouts], [sp for _, sp in layouts]


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_scored_spans_match_float64_reference_at_exactly_their_positions(
    tiny_server, tiny_model_dir, encoding
):
    """Every row of a spans request equals the float64 recompute of the whole sequence at
    exactly the spans' positions (candidates, top-k, entropy and ranks), in both encodings,
    with two option sets in flight together."""
    rng = np.random.default_rng(31)
    ref_model = ReferenceModel(tiny_model_dir)
    vocab = ref_model.model.config.vocab_size
    seqs, spans = _span_layouts(rng, vocab)
    positions = [span_positions(sp) for sp in spans]
    cands = [rng.integers(0, vocab, (len(p), 5)) for p in positions]
    option_sets = [
        ScoreOptions(top_k=8, entropy=True, token_rank=True),
        ScoreOptions(top_k=3, temperature=0.7, token_rank=True),
    ]
    requests = [PackedRequest.from_arrays(seqs, None, cands, o, spans=spans) for o in option_sets]
    with TeacherClient(tiny_server, encoding=encoding) as client, ThreadPoolExecutor(2) as pool:
        results = list(pool.map(client.score, requests))
    for request, result in zip(requests, results, strict=True):
        o = request.options
        assert np.diff(result.scored_offsets_n1).tolist() == [len(p) for p in positions]
        for i, scores in enumerate(result.sequences()):
            ref = ref_model.reference(seqs[i], None, o.temperature, positions=positions[i])
            assert_matches(
                scores, ref, seqs[i], None, cands[i], o.top_k, atol=1e-4, positions=positions[i]
            )
            assert (scores.entropy is not None) == o.entropy
            assert scores.token_ranks is not None


def test_score_from_is_one_span_to_the_end_bit_for_bit(tiny_server, tiny_model_dir):
    """score_from=s and score_spans=[[s, L]] are the same request: every number is equal bit
    for bit. A JSON body mixing both forms is read sequence by sequence, and usage counts all
    tokens as input and the spans' positions as scored."""
    rng = np.random.default_rng(32)
    seqs, sf, cands = _random_batch(rng, 5, 49152, 80, 4)
    options = ScoreOptions(top_k=6, entropy=True, token_rank=True)
    tail = PackedRequest.from_arrays(seqs, sf, cands, options)
    spans = [[(s, len(x))] for s, x in zip(sf, seqs, strict=True)]
    one_span = PackedRequest.from_arrays(seqs, None, cands, options, spans=spans)
    assert one_span.has_spans and not tail.has_spans
    with TeacherClient(tiny_server) as client:
        a, b = client.score(tail), client.score(one_span)
    np.testing.assert_array_equal(a.scored_offsets_n1, b.scored_offsets_n1)
    for name in ROW_ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)

    ref_model = ReferenceModel(tiny_model_dir)
    gapped = [(2, 4), (6, 7), (len(seqs[1]) - 1, len(seqs[1]))]
    body = {
        "top_k": 4,
        "entropy": True,
        "sequences": [
            {"token_ids": seqs[0].tolist(), "score_from": sf[0]},
            {"token_ids": seqs[1].tolist(), "score_spans": [list(p) for p in gapped]},
        ],
    }
    r = httpx.post(tiny_server + "/v1/score", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    n0, n1 = len(seqs[0]) - sf[0], len(span_positions(gapped))
    assert data["usage"] == {
        "sequences": 2,
        "input_tokens": len(seqs[0]) + len(seqs[1]),
        "scored_tokens": n0 + n1,
    }
    got = result_from_json_dict(data)
    assert np.diff(got.scored_offsets_n1).tolist() == [n0, n1]
    s0 = got.sequence(0)
    assert_matches(s0, ref_model.reference(seqs[0], sf[0]), seqs[0], sf[0], None, 4, atol=1e-4)
    pos = span_positions(gapped)
    ref = ref_model.reference(seqs[1], None, positions=pos)
    assert_matches(got.sequence(1), ref, seqs[1], None, None, 4, atol=1e-4, positions=pos)
