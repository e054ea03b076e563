"""The tiled scoring math (opd.modeling.scoring) against an independent float64 computation.

The LM head runs in tiles of rows x vocabulary columns, carrying log-sum-exp and entropy across a
row's tiles and merging each tile's top-k. These tests pick tile sizes that do not divide the
vocabulary, top-k wider than a tile and masked (-inf) logits, and check every number against
full float64 logits computed in one piece.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opd.modeling.scoring import HeadSpec, score_hidden
from opd.server.settings import Settings

VOCAB, HIDDEN = 1000, 24


def make_head(seed: int = 0, bias: bool = False) -> HeadSpec:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(VOCAB, HIDDEN, generator=g) * 0.8
    return HeadSpec(weight, torch.randn(VOCAB, generator=g) if bias else None)


def float64_reference(head: HeadSpec, h: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """log-probs [N, V] in float64, from logits computed whole (no tiles, no online sums)."""
    z = h.double() @ head.weight_VH.double().T
    if head.bias_V is not None:
        z = z + head.bias_V.double()
    if head.logit_scale is not None:
        z = z * head.logit_scale
    if head.final_softcap is not None:
        z = torch.tanh(z / head.final_softcap) * head.final_softcap
    return torch.log_softmax(z / temperature, dim=-1).numpy()


def entropy64(logp: np.ndarray) -> np.ndarray:
    p = np.exp(logp)
    return -(p * np.where(p > 0, logp, 0.0)).sum(-1)


def inputs(n: int, k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, HIDDEN, generator=g),
        torch.randint(0, VOCAB, (n,), generator=g),
        torch.randint(0, VOCAB, (n, k), generator=g),
    )


@pytest.mark.parametrize(
    ("rows", "cols"),
    [(8, 128), (37, 1000), (5, 999), (64, 0), (3, 7)],
    ids=["tiles-not-dividing-V", "one-tile", "last-tile-of-1", "whole-vocab", "tiny-tiles"],
)
def test_tiles_match_float64(rows: int, cols: int) -> None:
    head = make_head()
    h, targets, cands = inputs(37, 6)
    ref = float64_reference(head, h, temperature=0.7)
    out = score_hidden(head, h, targets, cands, 5, True, 0.7, rows, cols)
    n = np.arange(37)
    np.testing.assert_allclose(out.token_logprobs_N, ref[n, targets.numpy()], atol=2e-5)
    np.testing.assert_allclose(
        out.candidate_logprobs_NK, np.take_along_axis(ref, cands.numpy(), 1), atol=2e-5
    )
    order = np.argsort(-ref, axis=1)[:, :5]
    np.testing.assert_array_equal(out.top_k_ids_Nk, order)
    np.testing.assert_allclose(out.top_k_logprobs_Nk, np.take_along_axis(ref, order, 1), atol=2e-5)
    np.testing.assert_allclose(out.entropy_N, entropy64(ref), atol=2e-5)


def test_top_k_wider_than_a_tile() -> None:
    head = make_head(seed=3)
    h, targets, _ = inputs(11, 1, seed=4)
    ref = float64_reference(head, h)
    out = score_hidden(head, h, targets, None, 40, False, 1.0, 4, 16)
    order = np.argsort(-ref, axis=1)[:, :40]
    np.testing.assert_array_equal(out.top_k_ids_Nk, order)
    np.testing.assert_allclose(out.top_k_logprobs_Nk, np.take_along_axis(ref, order, 1), atol=2e-5)
    assert out.entropy_N is None and out.candidate_logprobs_NK is None


def test_tiled_equals_whole_vocabulary_pass() -> None:
    head = make_head(seed=5, bias=True)
    h, targets, cands = inputs(50, 8, seed=6)
    whole = score_hidden(head, h, targets, cands, 8, True, 1.0, 50, 0)
    tiled = score_hidden(head, h, targets, cands, 8, True, 1.0, 16, 96)
    np.testing.assert_array_equal(tiled.top_k_ids_Nk, whole.top_k_ids_Nk)
    for name in ("token_logprobs_N", "candidate_logprobs_NK", "top_k_logprobs_Nk", "entropy_N"):
        np.testing.assert_allclose(getattr(tiled, name), getattr(whole, name), atol=3e-6)


def test_scale_and_softcap_are_applied_per_tile() -> None:
    head = make_head(seed=7, bias=True)
    head.logit_scale, head.final_softcap = 1.7, 5.0
    h, targets, cands = inputs(20, 4, seed=8)
    ref = float64_reference(head, h)
    out = score_hidden(head, h, targets, cands, 3, True, 1.0, 6, 250)
    np.testing.assert_allclose(out.token_logprobs_N, ref[np.arange(20), targets.numpy()], atol=2e-5)
    np.testing.assert_allclose(out.entropy_N, entropy64(ref), atol=2e-5)


def test_masked_logits_give_minus_inf_and_no_nan() -> None:
    """A bias of -inf masks tokens (a whole tile of them here): their log-prob is -inf, every
    other number is finite and exact, and the online sums never produce nan."""
    head = make_head(seed=9, bias=True)
    head.bias_V[100:200] = -math.inf  # tile [100, 200) is masked entirely
    head.bias_V[555] = -math.inf
    h, targets, _ = inputs(9, 1, seed=10)
    targets[:] = 7
    cands = torch.tensor([[150, 555, 7, 999]] * 9)
    ref = float64_reference(head, h)
    out = score_hidden(head, h, targets, cands, 4, True, 1.0, 4, 100)
    assert np.isneginf(out.candidate_logprobs_NK[:, :2]).all()
    np.testing.assert_allclose(out.candidate_logprobs_NK[:, 2:], ref[:, [7, 999]], atol=2e-5)
    np.testing.assert_allclose(out.entropy_N, entropy64(ref), atol=2e-5)
    assert np.isfinite(out.top_k_logprobs_Nk).all()


def test_default_tiles_by_device() -> None:
    """CPU: 1,024 x 4,096 tiles that stay in cache; GPU: 256-row whole-vocabulary tiles; both
    settable."""
    assert Settings().scoring_tiles("cpu") == (1024, 4096)
    assert Settings().scoring_tiles("cuda") == (256, 0)
    assert Settings(logits_chunk_tokens=64, logits_chunk_vocab=0).scoring_tiles("cpu") == (64, 0)
    assert Settings(logits_chunk_vocab=8192).scoring_tiles("cuda") == (256, 8192)


def rank64(logp: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1 + how many ids have a log-prob at least the target's (the target counts itself)."""
    t = logp[np.arange(len(targets)), targets]
    return (logp >= t[:, None]).sum(-1)


@pytest.mark.parametrize(("rows", "cols"), [(8, 128), (37, 0), (5, 7)])
def test_token_rank_matches_float64(rows: int, cols: int) -> None:
    """Targets drawn from the top of each row and from anywhere: the rank is exact whichever
    tile holds the target, before or after the tiles that hold the ids above it."""
    head = make_head(seed=11, bias=True)
    h, targets, _ = inputs(37, 1, seed=12)
    ref = float64_reference(head, h, temperature=0.8)
    order = np.argsort(-ref, axis=1)
    targets[:10] = torch.from_numpy(order[:10, 0])  # rank 1
    targets[10:20] = torch.from_numpy(order[10:20, 3])  # rank 4
    out = score_hidden(head, h, targets, None, 0, False, 0.8, rows, cols, rank=True)
    expected = rank64(ref, targets.numpy())
    assert expected[:10].tolist() == [1] * 10 and expected[10:20].tolist() == [4] * 10
    np.testing.assert_array_equal(out.token_ranks_N, expected)
    off = score_hidden(head, h, targets, None, 0, False, 0.8, rows, cols)
    assert off.token_ranks_N is None


def test_token_rank_counts_exact_ties_against_the_token() -> None:
    """A bf16 head makes many logits exactly equal: every id tied with the target counts, as
    vLLM's `>=` count does, whichever tile it sits in."""
    head = make_head(seed=13)
    head.weight_VH = head.weight_VH.to(torch.bfloat16)
    h, targets, _ = inputs(16, 1, seed=14)
    head.weight_VH[500:505] = head.weight_VH[int(targets[0])]  # five exact copies of a target
    out = score_hidden(head, h, targets, None, 0, False, 1.0, 4, 128, rank=True)
    z = (h.to(torch.bfloat16) @ head.weight_VH.T).float().double()
    expected = (z >= z[np.arange(16), targets][:, None]).sum(-1).numpy()
    np.testing.assert_array_equal(out.token_ranks_N, expected)
    assert out.token_ranks_N[0] >= 6  # the target and its five copies
