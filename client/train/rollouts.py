"""On-policy rollouts: the student samples, then records what it thought at every position.

Notation: the field names and shape suffixes of opd.client.train.positions (T = this rollout's
completion length, K = student top-k, k = teacher top-k); arrays are per rollout.

Sampling uses an explicit GenerationConfig (temperature, top-p, no top-k cut, max new tokens) so
that a model's own generation defaults never change the policy. A completion ends at the first
EOS, which is kept and scored: whether to stop is a decision the teacher should judge too.
After sampling, one teacher-forced forward pass of the same weights records the student's
log-probs of its sampled tokens, its top-K ids with their full-vocabulary log-probs, and its
entropy: these are the rollout-time ("old") values the objectives and diagnostics use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from opd.client.train.positions import pad_right


@dataclass
class Rollout:
    prompt_index: int
    token_ids: np.ndarray  # prompt + completion, int64 [P + T]
    prompt_len: int
    truncated: bool  # hit max_new_tokens without EOS
    student_token_logp_T: np.ndarray
    student_topk_ids_TK: np.ndarray
    student_topk_logp_TK: np.ndarray
    student_entropy_T: np.ndarray
    # from the teacher service; None until scored, or when the request did not ask for it
    teacher_token_logp_T: np.ndarray | None = None
    teacher_cand_logp_TK: np.ndarray | None = None
    teacher_topk_ids_Tk: np.ndarray | None = None
    teacher_topk_logp_Tk: np.ndarray | None = None
    teacher_entropy_T: np.ndarray | None = None

    @property
    def completion_len(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def completion(self) -> np.ndarray:
        return self.token_ids[self.prompt_len :]


@dataclass(frozen=True)
class SamplingParams:
    """How the student samples: n completions per prompt at temperature / top-p."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    eos_token_id: int
    pad_token_id: int

    def with_n(self, n: int) -> SamplingParams:
        return replace(self, n=n)

    @classmethod
    def for_tokenizer(
        cls, tokenizer, n: int, temperature: float, top_p: float, max_new_tokens: int
    ) -> SamplingParams:
        """The tokenizer's EOS ends a completion; padding falls back to it when unset."""
        eos = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        return cls(n, temperature, top_p, max_new_tokens, eos, int(pad if pad is not None else eos))


@torch.no_grad()
def sample_completions(
    model, prompt_ids: list[int], params: SamplingParams
) -> list[tuple[np.ndarray, bool]]:
    """n sampled completions of one prompt: (completion ids up to and including EOS, truncated)."""
    from transformers import GenerationConfig

    eos_token_id = params.eos_token_id
    config = GenerationConfig(
        do_sample=True,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=0,
        max_new_tokens=params.max_new_tokens,
        num_return_sequences=params.n,
        eos_token_id=eos_token_id,
        pad_token_id=params.pad_token_id,
    )
    device = next(model.parameters()).device
    inputs = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    # transformers fills options left unset in `config` from the checkpoint's
    # generation_config.json (repetition penalty, min_p, min_new_tokens...), which would change
    # the policy away from the distribution the student's statistics and losses assume. Swap in
    # the library's defaults for this call; the model's own config is restored (and saved).
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        out = model.generate(
            inputs, attention_mask=torch.ones_like(inputs), generation_config=config
        )
    finally:
        model.generation_config = saved
    completions = []
    for row in out[:, len(prompt_ids) :].cpu().numpy():
        stops = np.flatnonzero(row == eos_token_id)
        if stops.size:
            completions.append((row[: stops[0] + 1].astype(np.int64), False))
        else:
            completions.append((row.astype(np.int64), True))
    return completions


@torch.no_grad()
def student_position_stats(
    model, sequences: list[np.ndarray], prompt_lens: list[int], top_k: int
) -> list[dict[str, np.ndarray]]:
    """One teacher-forced pass over right-padded sequences: per completion position, the
    student's log p(sampled token), top-K ids and log-probs, and full-vocabulary entropy."""
    device = next(model.parameters()).device
    ids_BL, mask_BL = pad_right(sequences)
    logits = model(
        input_ids=torch.from_numpy(ids_BL).to(device),
        attention_mask=torch.from_numpy(mask_BL).to(device),
    ).logits
    stats = []
    for b, (seq, p) in enumerate(zip(sequences, prompt_lens, strict=True)):
        logp = torch.log_softmax(logits[b, p - 1 : len(seq) - 1].float(), dim=-1)  # [T, V]
        target = torch.from_numpy(seq[p:]).to(device)
        top_lp, top_ids = torch.topk(logp, top_k, dim=-1)
        entropy = -(logp.exp() * logp).nan_to_num().sum(-1)
        stats.append(
            {
                "student_token_logp_T": logp.gather(1, target[:, None])[:, 0].cpu().numpy(),
                "student_topk_ids_TK": top_ids.cpu().numpy().astype(np.int64),
                "student_topk_logp_TK": top_lp.cpu().numpy(),
                "student_entropy_T": entropy.cpu().numpy(),
            }
        )
    return stats


def make_rollouts(
    model, prompt_index: int, prompt_ids: list[int], params: SamplingParams, top_k: int
) -> list[Rollout]:
    """Sample n completions of one prompt and record the student's rollout-time statistics."""
    was_training = model.training
    model.eval()
    try:
        completions = sample_completions(model, prompt_ids, params)
        # An empty completion (EOS-less zero tokens cannot happen; EOS alone is 1 token) is fine.
        seqs = [np.concatenate([np.asarray(prompt_ids, np.int64), c]) for c, _ in completions]
        stats = student_position_stats(model, seqs, [len(prompt_ids)] * len(seqs), top_k)
    finally:
        model.train(was_training)
    return [
        Rollout(prompt_index, seq, len(prompt_ids), truncated, **st)
        for seq, (_, truncated), st in zip(seqs, completions, stats, strict=True)
    ]
