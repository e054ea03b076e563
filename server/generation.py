"""Teacher generation (POST /v1/generate): the types both backends return, and the HF sampler.

Why the teacher generates at all: an off-policy cold start SFTs the student on teacher responses
before OPD (opd coldstart; docs/recipes.md). The scoring path never samples, so generation is
kept apart from it: its own single-thread executor in the service, its own seeding.

Seeding: prompt i of a request samples with `seed + i`, so a prompt's completions depend only on
the request's seed and the prompt's index, never on what else was in flight.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from opd.shared.schemas import GenerateOptions


@dataclass
class Generated:
    """One completion: ids up to and including the first EOS, and why it ended."""

    token_ids: list[int]
    finish_reason: str  # "stop" | "length"


def eos_ids(tokenizer: object, generation_config: object | None) -> set[int]:
    """Every id that ends a turn: the tokenizer's EOS plus the model's generation-config EOS."""
    ids: set[int] = set()
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(int(tok_eos))
    gen_eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return ids


def cut_at_eos(row: np.ndarray | list[int], eos: set[int]) -> Generated:
    """A generated row cut after its first EOS (kept); padding after it dropped."""
    ids = [int(t) for t in row]
    for j, t in enumerate(ids):
        if t in eos:
            return Generated(ids[: j + 1], "stop")
    return Generated(ids, "length")


class HFGenerator:
    """model.generate, one prompt at a time (no padding, so no padding-dependent numerics).

    Batching prompts would be faster; the HF backend is the reference and CPU backend, vLLM's
    continuous batching is the throughput path (docs/vllm.md)."""

    def __init__(self, model: torch.nn.Module, tokenizer: object) -> None:
        from transformers import GenerationConfig

        self.model = model
        self.eos = eos_ids(tokenizer, getattr(model, "generation_config", None))
        if not self.eos:
            raise ValueError("the model has no EOS token: cannot end a completion")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad = int(pad) if pad is not None else min(self.eos)
        # transformers fills every option a GenerationConfig leaves unset from the checkpoint's
        # generation_config.json (repetition penalty, min_p, min_new_tokens...). The service
        # samples the model's plain distribution, the one /v1/score reports, and the vLLM backend
        # ignores those defaults too: so the defaults the model sees are the library's own.
        model.generation_config = GenerationConfig()
        # torch's global RNG is what generate samples from: one generation at a time.
        self._lock = threading.Lock()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], options: GenerateOptions) -> list[list[Generated]]:
        from transformers import GenerationConfig

        greedy = options.temperature == 0
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else options.temperature,
            top_p=None if greedy else options.top_p,
            top_k=None if greedy else 0,  # no top-k cut: the distribution the service scores
            max_new_tokens=options.max_tokens,
            # greedy repeats are identical: decode once, copy
            num_return_sequences=1 if greedy else options.n,
            eos_token_id=sorted(self.eos),
            pad_token_id=self.pad,
        )
        device = next(self.model.parameters()).device
        results = []
        for i, ids in enumerate(prompts):
            inputs = torch.tensor([ids], dtype=torch.long, device=device)
            with self._lock:
                if options.seed is not None:
                    torch.manual_seed(options.seed + i)
                out = self.model.generate(
                    inputs, attention_mask=torch.ones_like(inputs), generation_config=config
                )
            rows = [cut_at_eos(row, self.eos) for row in out[:, len(ids) :].cpu().numpy()]
            results.append(rows * options.n if greedy else rows)
        return results
