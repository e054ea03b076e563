"""The student's bounded-memory math against unchunked and float64 references.

- rollout statistics (position_stats, batched, LM head in tiles) equal an unbatched float64
  log_softmax of the model's own full logits (tests/support/reference.py);
- the chunked loss (LM head + objective on a few rows at a time, activation checkpointing) and
  its gradients equal the unchunked loss's for every objective, the discounted sampled one
  included (its advantages run along whole sequences, across chunk boundaries).
"""

from __future__ import annotations

from dataclasses import replace

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


ONE_FORWARD_OBJECTIVES = [
    ObjectiveConfig(name="sampled"),
    ObjectiveConfig(name="sampled", discount=0.9),
    ObjectiveConfig(name="sampled", clip_eps=0.2),
    ObjectiveConfig(name="student-topk"),
    ObjectiveConfig(name="student-topk", topk_variant="renormalized"),
    ObjectiveConfig(name="teacher-topk"),
    ObjectiveConfig(name="jsd", jsd_beta=0.3),
    ObjectiveConfig(name="overlap-topk", clip_eps=0.2),
]


@pytest.mark.parametrize(
    "objective", ONE_FORWARD_OBJECTIVES, ids=lambda o: f"{o.name}-{o.topk_variant}-{o.discount}"
)
def test_one_forward_equals_the_statistics_pass_then_the_loss(tiny_model_dir, objective):
    """The one-forward step (candidate ids from the sampler, the student's numbers recorded by
    the loss pass) against the two-forward step (a statistics pass, then the loss), with the
    same candidate ids: same per-row loss, same gradients, the recorded numbers equal to the
    statistics pass's, the same diagnostics, and a later epoch's batch equal to the
    two-forward one (float64)."""
    from opd.client.train.diagnostics import compute_diagnostics
    from opd.client.train.trainer import fill_student_numbers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    rollouts, stats = _batch(model, np.random.default_rng(2))
    # the statistics pass's numbers, independently in float64 (whole logits, one sequence at a
    # time), so the comparison is not limited by the float32 the pass stores
    token, cand, entropy = _float64_student_numbers(model, rollouts, stats.student_topk_ids_NK)
    stats = replace(
        stats, student_token_logp_N=token, student_topk_logp_NK=cand, student_entropy_N=entropy
    )
    module = StudentModule(model, objective, chunk_tokens=7)  # chunks cut sequences apart
    cpu = torch.device("cpu")

    def backward(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        (loss * torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    two = TokenBatch.build(rollouts, stats, cpu)
    two = replace(
        two,
        student_token_logp_N=torch.from_numpy(token),
        student_topk_logp_NK=torch.from_numpy(cand),
    )
    loss_two = module("loss", two)
    grads_two = backward(loss_two)

    # the same rollouts as the sampler leaves them: candidate ids only
    fresh = [
        replace(r, student_token_logp_T=None, student_topk_logp_TK=None, student_entropy_T=None)
        for r in rollouts
    ]
    one = TokenBatch.build(fresh, PositionStats.from_rollouts(fresh), cpu)
    assert one.student_token_logp_N is None and one.student_topk_logp_NK is None
    loss_one, numbers = module("loss", one, True)
    grads_one = backward(loss_one)

    torch.testing.assert_close(loss_one, loss_two, rtol=1e-9, atol=1e-12)
    assert grads_one.keys() == grads_two.keys() and grads_two
    for name, g in grads_one.items():
        torch.testing.assert_close(g, grads_two[name], rtol=1e-8, atol=1e-11)

    np.testing.assert_allclose(numbers.token_logp_N.numpy(), token, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(numbers.cand_logp_NK.numpy(), cand, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(numbers.entropy_N.numpy(), entropy, rtol=1e-10, atol=1e-12)
    # the candidates were the trainer's own top-K here, so its own top-K is the same
    np.testing.assert_array_equal(numbers.topk_ids_NK.numpy(), stats.student_topk_ids_NK)

    own: list[np.ndarray] = []
    later = fill_student_numbers(fresh, one, numbers, own)
    assert [len(o) for o in own] == [r.completion_len for r in rollouts]
    filled = PositionStats.from_rollouts(fresh)
    got, want = compute_diagnostics(filled), compute_diagnostics(stats)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), key
    # a later ppo epoch reads the recorded values as p_old: the two-forward loss again
    torch.testing.assert_close(module("loss", later), loss_two, rtol=1e-9, atol=1e-12)


def _float64_student_numbers(model, rollouts: list[Rollout], cand_NK: np.ndarray):
    """log p of each sampled token, at the candidate ids, and the entropy, from the model's
    whole float64 logits."""
    rows = []
    with torch.no_grad():
        for r in rollouts:
            logits = model(torch.from_numpy(r.token_ids)[None]).logits[0].double()
            rows.append(torch.log_softmax(logits, -1)[r.prompt_len - 1 : -1])
    logp_NV = torch.cat(rows)
    target = torch.from_numpy(np.concatenate([r.completion for r in rollouts]))
    token = logp_NV.gather(1, target[:, None])[:, 0]
    cand = logp_NV.gather(1, torch.from_numpy(cand_NK.astype(np.int64)))
    entropy = -(logp_NV.exp() * logp_NV).sum(-1)
    return token.numpy(), cand.numpy(), entropy.numpy()


def test_a_batch_without_student_numbers_needs_the_recording_pass(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rollouts, _ = _batch(model, np.random.default_rng(3))
    fresh = [replace(r, student_token_logp_T=None, student_topk_logp_TK=None) for r in rollouts]
    batch = TokenBatch.build(fresh, PositionStats.from_rollouts(fresh), torch.device("cpu"))
    with pytest.raises(ValueError, match="needs record"):
        StudentModule(model, ObjectiveConfig(name="sampled"))("loss", batch)


@pytest.mark.parametrize(
    "objective",
    [ObjectiveConfig(name="student-topk"), ObjectiveConfig(name="sampled", discount=0.9)],
    ids=lambda o: o.name,
)
def test_rollouts_of_one_prompt_share_its_pass(tiny_model_dir, objective):
    """share_prompts: the n rollouts of a prompt run it through the decoder once (its KV cache
    repeated); the loss, its gradients and the statistics equal the unshared pass (float64)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    rng = np.random.default_rng(4)
    vocab = model.config.vocab_size
    prompts = [rng.integers(0, vocab, p).astype(np.int64) for p in (6, 3)]
    # 3 rollouts of the first prompt, 2 of the second, one alone; ragged completions
    plan = [(0, 5), (0, 9), (0, 1), (1, 7), (1, 4)]
    seqs = [np.concatenate([prompts[i], rng.integers(0, vocab, t)]) for i, t in plan]
    seqs.append(rng.integers(0, vocab, 11).astype(np.int64))
    lens = [len(prompts[i]) for i, _ in plan] + [4]
    # one batch (the same rollout-time values) for both passes
    stats = position_stats(StudentModule(model, share_prompts=False), seqs, lens, top_k=K)
    rollouts = [
        Rollout(i, s, p, False, **st, teacher_token_logp_T=st["student_token_logp_T"] - 0.3,
                teacher_cand_logp_TK=st["student_topk_logp_TK"] - 0.2)
        for i, (s, p, st) in enumerate(zip(seqs, lens, stats, strict=True))
    ]  # fmt: skip
    batch = TokenBatch.build(rollouts, PositionStats.from_rollouts(rollouts), torch.device("cpu"))
    results = {}
    for share in (False, True):
        module = StudentModule(model, objective, chunk_tokens=5, share_prompts=share)
        stats = position_stats(module, seqs, lens, top_k=K)
        model.zero_grad(set_to_none=True)
        loss = module("loss", batch)
        (loss * torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[share] = (stats, loss.detach(), grads)
        assert module.share_prompts == share  # the tiny Llama's cache repeats: nothing fell back
    (stats0, loss0, grads0), (stats1, loss1, grads1) = results[False], results[True]
    for a, b in zip(stats0, stats1, strict=True):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    torch.testing.assert_close(loss1, loss0, rtol=1e-9, atol=1e-12)
    assert grads1.keys() == grads0.keys()
    # Gradients into the prompt: float32 rounding. LlamaRMSNorm computes in float32 even in a
    # float64 model, and the n copies' gradients are summed before its backward when shared
    # (the repeated cache), after it when not (the embedding); every other row is exact.
    for name, g in grads1.items():
        scale = float(grads0[name].abs().max())
        assert float((g - grads0[name]).abs().max()) <= 1e-5 * scale, name
