"""Numbers from a real server process equal an independent float64 computation.

Sequences of random lengths and options are sent concurrently by several clients so that the
batcher packs them together (and with each other's different options); each result must still
match the reference computed from that sequence alone.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from opd.client import TeacherClient
from opd.shared.packed import PackedRequest
from opd.shared.schemas import ScoreOptions
from tests.support.reference import ReferenceModel, assert_matches, chat_batch


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
