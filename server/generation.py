"""Teacher generation (POST /v1/generate): the types both backends return, and the HF sampler.

Why the teacher generates at all: an off-policy cold start SFTs the student on teacher responses
before OPD (opd coldstart; docs/recipes.md). The scoring path never samples, so generation is
kept apart from it: its own single-thread executor in the service, its own seeding.

Seeding: prompt i of a request samples with `seed + i`, so a prompt's completions depend only on
the request's seed and the prompt's index, never on what else was in flight.
"""

from __future__ import annotations

import threading

import torch

from opd.modeling.eos import Generated, cut_at_eos, eos_ids
from opd.shared.schemas import GenerateOptions


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
