"""The benchmark's workload: the same token sequences for every contender, and its FLOP count.

Sequences are random token ids (uniform over the vocabulary, fixed seed): throughput does not
depend on what the tokens say, and random ids are reproducible without a tokenizer or dataset.
With rollouts_per_prompt = n > 1, consecutive groups of n sequences of a request share their
prompt, the shape of OPD traffic (the trainer sends n rollouts of one prompt together).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from opd.shared.packed import PackedRequest
from opd.shared.schemas import ScoreOptions


class WorkloadConfig(BaseModel):
    """The sequences every contender scores (the flags of `opd bench` come from these fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sequences: int = Field(default=32, ge=1, description="sequences per round")
    prompt_len: int = Field(default=64, ge=1, description="prompt tokens (not scored)")
    completion_len: int = Field(default=192, ge=1, description="completion tokens (scored)")
    top_k: int = Field(default=16, ge=0, description="teacher top-k")
    candidates: int = Field(
        default=16, ge=0, description="caller-chosen candidate ids per position"
    )
    seqs_per_request: int = Field(default=4, ge=1, description="sequences per HTTP request")
    rollouts_per_prompt: int = Field(
        default=1,
        ge=1,
        description="sequences sharing one prompt (OPD's n rollouts); 1 = unique",
    )
    seed: int = Field(default=0, description="seed of the random token ids")

    @model_validator(mode="after")
    def _groups_fit_requests(self) -> WorkloadConfig:
        if self.seqs_per_request % self.rollouts_per_prompt:
            raise ValueError(
                f"seqs_per_request={self.seqs_per_request} must be a multiple of "
                f"rollouts_per_prompt={self.rollouts_per_prompt}"
            )
        return self

    def to_dict(self) -> dict[str, int]:
        return self.model_dump()

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.completion_len

    @property
    def scored_tokens(self) -> int:
        """Positions scored per round: every completion token of every sequence."""
        return self.sequences * self.completion_len


def make_requests(cfg: WorkloadConfig, vocab_size: int) -> list[PackedRequest]:
    """The round's requests, seqs_per_request sequences each, scored from the completion on.

    Options: top_k teacher top-k, `candidates` caller-chosen ids per position, exact entropy,
    float16 log-probs (what a trainer asks for).
    """
    rng = np.random.default_rng(cfg.seed)
    options = ScoreOptions(top_k=cfg.top_k, entropy=True, logprob_dtype="float16")
    requests = []
    for start in range(0, cfg.sequences, cfg.seqs_per_request):
        n = min(cfg.seqs_per_request, cfg.sequences - start)
        seqs = []
        for j in range(n):
            if j % cfg.rollouts_per_prompt == 0:
                prompt = rng.integers(0, vocab_size, cfg.prompt_len)
            completion = rng.integers(0, vocab_size, cfg.completion_len)
            seqs.append(np.concatenate([prompt, completion]))
        cands = (
            [rng.integers(0, vocab_size, (cfg.completion_len, cfg.candidates)) for _ in range(n)]
            if cfg.candidates
            else None
        )
        requests.append(PackedRequest.from_arrays(seqs, [cfg.prompt_len] * n, cands, options))
    return requests


def forward_flops(config: object, seq_len: int, scored: int) -> float:
    """FLOPs of one causal forward over seq_len tokens with the LM head on `scored` rows only.

    2 FLOPs per multiply-add: attention and MLP projections per token, QK^T and AV over the
    causal prefix, and the head (hidden x vocab) on the scored rows: the least work any scorer
    must do, which makes it the denominator of the matmul-bound limit.
    """
    h = int(config.hidden_size)
    layers = int(config.num_hidden_layers)
    inter = int(config.intermediate_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", heads) or heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    vocab = int(config.vocab_size)
    proj = 2 * h * (heads * head_dim) * 2 + 2 * h * (kv_heads * head_dim) * 2  # q, o, k, v
    mlp = 2 * h * inter * 3  # gate, up, down
    per_token = layers * (proj + mlp)
    # sum over positions t of the causal prefix length t+1, for QK^T and AV
    attention = layers * 2 * 2 * heads * head_dim * (seq_len * (seq_len + 1) / 2)
    return per_token * seq_len + attention + 2 * h * vocab * scored


def workload_flops(config: object, cfg: WorkloadConfig) -> float:
    """FLOPs of one round at the least work: each distinct prompt through the decoder once,
    every completion once (attending over its prompt), the head on the scored rows only."""
    seqs, p, c = cfg.sequences, cfg.prompt_len, cfg.completion_len
    prompts = -(-seqs // cfg.rollouts_per_prompt)
    if cfg.rollouts_per_prompt == 1:
        return forward_flops(config, cfg.seq_len, c) * seqs
    prompt_part = forward_flops(config, p, 0)
    completions = forward_flops(config, p + c, c) - forward_flops(config, p, 0)
    return prompts * prompt_part + seqs * completions
