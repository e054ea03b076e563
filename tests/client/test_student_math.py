"""The student's bounded-memory math against unchunked and float64 references.

- rollout statistics (position_stats, batched, LM head in tiles) equal an unbatched float64
  log_softmax of the model's own full logits (tests/support/reference.py);
- the chunked loss (LM head + objective on a few rows at a time, activation checkpointing) and
  its gradients equal the unchunked loss's for every objective, the discounted sampled one
  included (its advantages run along whole sequences, across chunk boundaries).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.client.train.objectives import ObjectiveConfig
from opd.client.train.positions import PositionStats, TokenBatch
from opd.client.train.rollouts import Rollout
from opd.client.train.student_math import StudentModule, position_stats
from tests.support.reference import ReferenceModel

K, KT = 4, 3


def _sequences(rng: np.random.Generator, vocab: int) -> tuple[list[np.ndarray], list[int]]:
    lens = [(5, 9), (3, 14), (7, 1), (4, 6)]  # (prompt, completion): ragged, one 1-token
    seqs = [rng.integers(0, vocab, p + t).astype(np.int64) for p, t in lens]
    return seqs, [p for p, _ in lens]


def test_position_stats_equal_a_float64_reference(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    student = StudentModule(model, chunk_tokens=5)  # chunks cut across sequences
    seqs, prompt_lens = _sequences(np.random.default_rng(0), model.config.vocab_size)
    # batch_tokens forces several decoder micro-batches as well
    stats = position_stats(student, seqs, prompt_lens, top_k=K, batch_tokens=30)
    ref_model = ReferenceModel(tiny_model_dir)
    for seq, p, st in zip(seqs, prompt_lens, stats, strict=True):
        ref = ref_model.reference(seq, p)
        np.testing.assert_allclose(st["student_token_logp_T"], ref.token(seq[p:]), atol=2e-4)
        np.testing.assert_allclose(st["student_topk_logp_TK"], ref.top_values(K), atol=2e-4)
        top_ids, top_lp = st["student_topk_ids_TK"], st["student_topk_logp_TK"]
        np.testing.assert_allclose(ref.at(top_ids), top_lp, atol=2e-4)
        np.testing.assert_allclose(st["student_entropy_T"], ref.entropy(), atol=2e-4)
    assert model.training  # position_stats restores the mode it found


def _batch(model, rng: np.random.Generator) -> tuple[list[Rollout], PositionStats]:
    """Rollouts with plausible student numbers (from the model) and random teacher numbers."""
    seqs, prompt_lens = _sequences(rng, model.config.vocab_size)
    stats = position_stats(StudentModule(model), seqs, prompt_lens, top_k=K)
    rollouts = []
    for i, (seq, p, st) in enumerate(zip(seqs, prompt_lens, stats, strict=True)):
        t = len(seq) - p
        noise_T = rng.normal(0, 0.5, t).astype(np.float32)
        noise_TK = rng.normal(0, 0.5, (t, K)).astype(np.float32)
        rollouts.append(
            Rollout(
                i, seq, p, False, **st,
                teacher_token_logp_T=st["student_token_logp_T"] + noise_T,
                teacher_cand_logp_TK=st["student_topk_logp_TK"] + noise_TK,
                teacher_topk_ids_Tk=st["student_topk_ids_TK"][:, :KT].copy(),
                teacher_topk_logp_Tk=st["student_topk_logp_TK"][:, :KT] - 0.1,
                teacher_entropy_T=st["student_entropy_T"],
            )
        )  # fmt: skip
    return rollouts, PositionStats.from_rollouts(rollouts)


@pytest.mark.parametrize(
    "objective",
    [
        ObjectiveConfig(name="sampled"),
        ObjectiveConfig(name="sampled", discount=0.9),
        ObjectiveConfig(name="student-topk"),
        ObjectiveConfig(name="student-topk", topk_variant="renormalized"),
        ObjectiveConfig(name="teacher-topk"),
        ObjectiveConfig(name="jsd", jsd_beta=0.3),
        ObjectiveConfig(name="overlap-topk"),
    ],
    ids=lambda o: f"{o.name}-{o.topk_variant}-{o.discount}",
)
def test_chunked_loss_and_gradients_equal_the_unchunked(tiny_model_dir, objective):
    # float64, so that summation order (chunked or not) cannot hide a real difference
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    rollouts, stats = _batch(model, np.random.default_rng(1))
    batch = TokenBatch.build(rollouts, stats, torch.device("cpu"))
    results = {}
    for chunk in (0, 3, 7):  # 0: all 30 rows at once; 3 and 7 cut sequences apart
        model.zero_grad(set_to_none=True)
        loss = StudentModule(model, objective, chunk_tokens=chunk)("loss", batch)
        weights = torch.linspace(0.5, 1.5, loss.shape[0])  # rows mixed up would not match
        (loss * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[chunk] = (loss.detach(), grads)
    ref_loss, ref_grads = results[0]
    assert ref_loss.shape == (stats.n_positions,)
    assert any(g.abs().sum() > 0 for g in ref_grads.values())
    for chunk in (3, 7):
        loss, grads = results[chunk]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-11)
