"""TrainConfig: every knob of `opd train` in one typed object, logged whole at start.

Defaults follow the paper (see ../shared/docs/opd-reference.md): student top-k with k = 16,
rollout temperature 1.0 and top-p 1.0, 4 rollouts per prompt, lr 1e-6, token-mean loss, no
KL-to-reference, no entropy bonus; PPO-style clipping only when rollouts are reused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from opd.client.train.objectives import OBJECTIVES, ObjectiveConfig


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # --- who
    student: str = Field(description="student model folder (AutoModelForCausalLM)")
    teacher_url: list[str] = Field(min_length=1, description="teacher service URL(s)")
    api_key: str | None = Field(default=None, description="teacher API key (OPD_API_KEY)")
    allow_tokenizer_mismatch: bool = False

    # --- data
    prompts: str = Field(default="shipped", description="JSONL, Parquet, HF folder or 'shipped'")
    prompt_field: str = "prompt"
    shuffle: bool = True
    holdout: int = Field(
        default=0, ge=0, description="last N prompts kept out of training (for evaluation)"
    )
    seed: int = 0
    epochs: int | None = Field(default=None, ge=1, description="stop after this many epochs")
    max_steps: int = Field(default=100, ge=1)

    # --- rollouts
    prompts_per_step: int = Field(default=4, ge=1)
    n_rollouts: int = Field(default=4, ge=1, description="completions per prompt")
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=256, ge=1)
    student_top_k: int = Field(default=16, ge=1, description="K: candidate ids per position")
    teacher_top_k: int = Field(default=16, ge=1, description="teacher top-k for diagnostics")

    # --- objective
    objective: str = "student-topk"
    topk_variant: Literal["released", "renormalized"] = "released"
    discount: float = Field(default=0.0, ge=0, le=1)
    clip_eps: float | None = Field(default=None, gt=0)
    ppo_epochs: int = Field(default=1, ge=1, description="optimizer steps per rollout batch")
    tail: bool = True
    jsd_beta: float = Field(default=0.5, ge=0, le=1)

    # --- optimisation
    lr: float = Field(default=1e-6, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    micro_batch_size: int = Field(default=8, ge=1, description="sequences per backward pass")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    gradient_checkpointing: bool = False

    # --- bookkeeping
    run_dir: str = "runs/opd"
    checkpoint_every: int = Field(default=50, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    resume: str | None = Field(
        default=None,
        description="'latest', a checkpoint folder, or 'auto' (latest if any, else fresh)",
    )
    depth_bucket: int | None = Field(default=1024, ge=1, description="completion tokens/bucket")
    tensorboard: bool = True
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        self.objective_config().validate()
        return self

    def objective_config(self) -> ObjectiveConfig:
        return ObjectiveConfig(
            name=self.objective,
            topk_variant=self.topk_variant,
            discount=self.discount,
            clip_eps=self.clip_eps,
            tail=self.tail,
            jsd_beta=self.jsd_beta,
        )
