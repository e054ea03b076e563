"""The `hf` rollout engine: transformers' `generate` on the trainer's own module, batched.

All prompts of a call are sampled together, left-padded (causal models continue from the last
column, so every prompt must end there), with `n` return sequences each, in groups of at most
`max_sequences` sequences so the KV cache stays bounded. The engine holds no weights of its own:
it samples the trainer's module (through StudentModule's forward, so FSDP2 gathers shards), so
it is current by construction and `sync_weights` is free.

Sampling uses an explicit GenerationConfig (temperature, top-p, no top-k cut, max new tokens):
transformers would otherwise fill options left unset from the checkpoint's
generation_config.json (repetition penalty, min_p, min_new_tokens...), which would change the
policy away from the distribution the student's statistics and losses assume.

With `top_ids`, a hook on the LM head keeps the top-K ids of the raw logits at every sampled
position (the step's candidate ids: the one-forward step, docs/training.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from opd.client.train.engines.base import Sample
from opd.modeling.eos import cut_at_eos

if TYPE_CHECKING:
    from opd.client.train.rollouts import SamplingParams
    from opd.client.train.student_math import StudentModule


class HFEngine:
    name = "hf"
    holds_weights = False

    def __init__(self, student: StudentModule, max_sequences: int = 64) -> None:
        self.student = student
        self.model = student.model
        self.max_sequences = max_sequences

    @torch.no_grad()
    def sample(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]
    ) -> list[list[Sample]]:
        per_call = max(1, self.max_sequences // params.options.n)
        out: list[list[Sample]] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for a in range(0, len(prompts), per_call):
                # One seed per generate call (the first of its prompts): generate draws from
                # torch's global RNG, forked here so the caller's stream moves only by the seeds.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seeds[a])
                    out.extend(self._generate(prompts[a : a + per_call], params))
        finally:
            self.model.train(was_training)
        return out

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        from transformers import GenerationConfig

        common = dict(
            max_new_tokens=params.options.max_tokens,
            num_return_sequences=params.options.n,
            eos_token_id=list(params.eos_token_ids),
            pad_token_id=params.pad_token_id,
        )
        if params.options.temperature > 0:
            config = GenerationConfig(
                do_sample=True,
                temperature=params.options.temperature,
                top_p=params.options.top_p,
                top_k=0,
                **common,
            )
        else:  # temperature 0: greedy (checks and evaluation)
            config = GenerationConfig(do_sample=False, **common)
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), params.pad_token_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = p
            mask[i, width - len(p) :] = 1
        model = self.model
        saved, model.generation_config = model.generation_config, GenerationConfig()
        steps: list[torch.Tensor] = []
        hook = None
        if params.top_ids:
            hook = model.get_output_embeddings().register_forward_hook(
                _record_top_ids(steps, params.top_ids)
            )
        try:
            rows = self.student(
                "generate",
                torch.from_numpy(ids).to(device),
                attention_mask=torch.from_numpy(mask).to(device),
                generation_config=config,
            )
        finally:
            model.generation_config = saved
            if hook is not None:
                hook.remove()
        completions = rows[:, width:].cpu().numpy()
        top = torch.stack(steps, 1).cpu().numpy() if steps else None  # [B * n, steps, K]
        if top is not None and top.shape[1] != completions.shape[1]:
            raise RuntimeError(
                f"hf engine: {top.shape[1]} LM-head calls for {completions.shape[1]} tokens"
            )
        grouped = []
        n = params.options.n
        for i in range(len(prompts)):
            group = []
            for j in range(i * n, (i + 1) * n):
                sample = Sample.of(cut_at_eos(completions[j], params.eos_token_ids))
                if top is not None:
                    sample.topk_ids_TK = top[j, : len(sample.completion_ids)].astype(np.int64)
                group.append(sample)
            grouped.append(group)
        return grouped

    def sync_weights(self, state: Mapping[str, torch.Tensor]) -> float:
        return 0.0  # samples the trainer's module itself

    def sleep(self) -> None:
        return None

    def wake(self) -> None:
        return None

    def close(self) -> None:
        return None


def _record_top_ids(steps: list[torch.Tensor], k: int):
    """A forward hook on the LM head keeping the top-k ids of each call's last row: generate
    calls the head once per new token (the prefill's last row predicts the first), on the raw
    logits, before temperature and top-p (which keep their order), so these are the
    student's own top-k at every sampled position."""

    def hook(_module: torch.nn.Module, _inputs: object, out: torch.Tensor) -> None:
        steps.append(out[:, -1, :].topk(k, dim=-1).indices)

    return hook
