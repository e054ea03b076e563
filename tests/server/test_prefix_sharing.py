"""Shared-context packs on the HF backend: n rollouts of one prompt run the prompt once.

The grouping rule on constructed items; then the real SmolLM2 served by `opd serve` (sharing on,
the default) on a rollout-shaped batch (one prompt, ragged completions, plus unrelated
sequences) against the independent float64 reference, and against the same backend in-process
with sharing off.
"""

from __future__ import annotations

import numpy as np

from opd.client import TeacherClient
from opd.server.backends.base import ScoreItem
from opd.server.backends.hf import shared_context_groups
from opd.shared.packed import PackedRequest
from opd.shared.schemas import ScoreOptions
from tests.support.reference import ReferenceModel, assert_matches

OPTS = ScoreOptions(top_k=4, entropy=True)


def _item(ids: list[int], score_from: int) -> ScoreItem:
    return ScoreItem(np.array(ids, dtype=np.int32), score_from, None, OPTS)


def test_grouping_needs_the_same_context_and_enough_of_it():
    p = list(range(100, 120))  # a 20-token prompt
    items = [
        _item(p + [1, 2, 3], 20),
        _item(p + [4, 5], 20),
        _item(p + [6], 20),
        _item(p + [7, 8], 19),  # same tokens, other score_from: another context
        _item(list(range(200, 220)) + [1], 20),  # another prompt, alone
        _item(p[:10] + [1, 2], 10),  # shorter than min_prefix, with a twin below
        _item(p[:10] + [3, 4], 10),
    ]
    groups, singles = shared_context_groups(items, min_prefix=16)
    assert groups == [[0, 1, 2]]
    assert singles == [3, 4, 5, 6]
    assert shared_context_groups(items, min_prefix=0) == ([], list(range(7)))
    groups, _ = shared_context_groups(items, min_prefix=8)
    assert groups == [[0, 1, 2], [5, 6]]


def _rollout_request(tokenizer, rng: np.random.Generator) -> PackedRequest:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write two sentences about the sea and the sky."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ctx = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    seqs, score_from = [], []
    for n in (30, 12, 30, 5):  # 4 rollouts of one prompt, ragged completions
        seqs.append(np.array(ctx + rng.integers(0, len(tokenizer), n).tolist()))
        score_from.append(len(ctx))
    seqs.append(rng.integers(0, len(tokenizer), 40))  # unrelated sequences in the same pack
    score_from.append(3)
    seqs.append(np.array(ctx + [5, 6, 7]))  # same tokens as the prompt, scored from inside it
    score_from.append(len(ctx) - 4)
    cands = [
        rng.integers(0, len(tokenizer), (len(s) - f, 8))
        for s, f in zip(seqs, score_from, strict=True)
    ]
    return PackedRequest.from_arrays(seqs, score_from, cands, ScoreOptions(top_k=8, entropy=True))


def test_shared_prompts_match_float64_and_the_unshared_path(smol_server, smollm2_dir):
    from transformers import AutoTokenizer

    from opd.server.backends.base import items_from_request
    from opd.server.backends.hf import HFBackend
    from opd.server.settings import Settings

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    request = _rollout_request(tokenizer, np.random.default_rng(0))
    groups, _ = shared_context_groups(items_from_request(request), min_prefix=16)
    assert groups == [[0, 1, 2, 3]]  # the batch does exercise sharing
    with TeacherClient(smol_server) as teacher:
        served = teacher.score(request)
    ref = ReferenceModel(smollm2_dir)
    for i in range(request.n_sequences):
        ids, s = request.tokens(i), int(request.score_from_n[i])
        assert_matches(
            served.sequence(i), ref.reference(ids, s), ids, s, request.candidates(i), 8, 1e-4
        )
    unshared = HFBackend(
        Settings(model=str(smollm2_dir), dtype="float32", device="cpu", min_shared_prefix=0)
    )
    unshared.load()
    rows = unshared.score_pack(items_from_request(request))
    # The two paths multiply different shapes (the prompt once, or once per sequence), so their
    # float32 sums round differently: 2.1e-5 apart on one entropy with OpenBLAS in the streams
    # (opd.modeling.cpu_gemm). Each is held to 1e-4 against float64 above.
    for i, r in enumerate(rows):
        got = served.sequence(i)
        np.testing.assert_allclose(got.token_logprobs, r.token_logprobs_N, atol=5e-5, rtol=0)
        np.testing.assert_allclose(got.entropy, r.entropy_N, atol=5e-5, rtol=0)


def test_models_whose_cache_cannot_be_repeated_fall_back_to_plain_packs(
    tiny_model_dir, monkeypatch
):
    """Hybrid models (recurrent layers) cannot repeat their cache: the pack is scored the
    plain way, with the same numbers, and sharing stays off for that model."""
    from opd.server.backends import hf
    from opd.server.settings import Settings

    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 49152, 20).tolist()
    items = [_item(prompt + rng.integers(0, 49152, n).tolist(), 20) for n in (5, 9, 3)]
    settings = Settings(model=str(tiny_model_dir), dtype="float32", device="cpu")
    shared = hf.HFBackend(settings)
    shared.load()
    expected = shared.score_pack(items)  # the repeatable (Llama) cache: sharing used
    from opd.modeling import shared_prefix

    monkeypatch.setattr(shared_prefix, "repeatable", lambda cache: False)
    fallback = hf.HFBackend(settings)
    fallback.load()
    got = fallback.score_pack(items)
    assert fallback._share_prefixes is False
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a.token_logprobs_N, b.token_logprobs_N, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.entropy_N, b.entropy_N, atol=1e-5, rtol=0)


def test_a_real_llama_cache_is_repeatable(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from opd.modeling.shared_prefix import repeatable

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        cache = model(torch.tensor([[1, 2, 3]]), use_cache=True).past_key_values
    assert repeatable(cache)
    assert not repeatable(object())
