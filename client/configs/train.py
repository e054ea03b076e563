"""TrainConfig: every knob of `opd train` in one typed object, logged whole at start.

It is composed of the shared option groups (opd.client.configs.groups): the student, its
teachers, the prompt data, the rollout sampling, the objective, the update, in-training
evaluation; the rest are the run's own settings. `opd train`'s flags are generated from it
(opd.shared.config_cli; `cli` below keeps the short flag names users know), `--config FILE`
reads the same shape, and the run writes it to RUN_DIR/config.json, which replays the run.
`opd coldstart`'s OPD stage is a part of it (`OPDStage`).

Defaults follow the paper (docs/method.md): student top-k with k = 16, rollout temperature 1.0
and top-p 1.0, 4 rollouts per prompt, lr 1e-6, token-mean loss, no KL-to-reference, no entropy
bonus; PPO-style clipping only when rollouts are reused.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from opd.client.configs.groups import (
    PROMPTS_HELP,
    EpisodeGroup,
    Group,
    HorizonGroup,
    InTrainingEval,
    ObjectiveConfig,
    ReanchorGroup,
    SamplingGroup,
    StudentGroup,
    TrainTeachers,
    with_defaults,
)
from opd.client.train.loggers import DEFAULT_LOGGERS, LoggerName
from opd.shared.config_cli import CliSpec, flag_model


class DataGroup(Group):
    """Data: the training prompts and how they are taken."""

    prompts: str = Field(default="shipped", description=PROMPTS_HELP)
    prompt_field: str = Field(default="prompt", description="field holding the prompt text")
    shuffle: bool = Field(default=True, description="shuffle prompts each epoch")
    holdout: int = Field(
        default=0, ge=0, description="last N prompts kept out of training (for evaluation)"
    )
    epochs: int | None = Field(default=None, ge=1, description="stop after this many epochs")
    prompts_per_step: int = Field(default=4, ge=1, description="prompts per step")


class OptimGroup(Group):
    """Update: the optimizer, its schedule, and how the student's passes are cut."""

    lr: float = Field(default=1e-6, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    adam_betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        default="constant", description="learning-rate schedule after warmup"
    )
    warmup_steps: int = Field(default=0, ge=0, description="linear warmup steps")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="gradient clipping")
    ppo_epochs: int = Field(default=1, ge=1, description="optimizer steps per rollout batch")
    micro_batch_size: int = Field(default=8, ge=1, description="sequences per backward pass")
    gradient_checkpointing: bool = Field(default=False, description="trade compute for memory")
    head_chunk_tokens: int = Field(
        default=512,
        ge=0,
        description="completion positions per LM-head chunk in the loss and statistics "
        "(bounds the [positions, vocab] memory; 0 = all at once)",
    )
    fsdp: bool = Field(
        default=False, description="under torchrun: shard the student with FSDP2, not DDP"
    )
    overlap_forward: bool = Field(
        default=True,
        description="the first micro-batch's decoder forward runs while the teacher scores "
        "(single process); off where the teacher shares the student's cores",
    )
    share_prompts: bool = Field(
        default=True,
        description="the n rollouts of a prompt run it through the student's decoder once "
        "(its KV cache repeated); off under --fsdp",
    )


class LoraGroup(Group):
    """LoRA: train low-rank adapters in place of the student's weights (peft)."""

    rank: int = Field(default=0, ge=0, description="adapter rank; 0 trains every weight")
    alpha: float = Field(default=32.0, gt=0, description="adapter scale numerator (alpha / rank)")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        description="module names to adapt (repeatable); all-linear: every linear layer but "
        "the LM head",
    )
    sync: Literal["adapters", "merged"] = Field(
        default="adapters",
        description="how the vllm engine gets a step's student: the adapters alone (vLLM's "
        "LoRA support) or the weights with the adapters merged (plain sampling; faster on "
        "CPU, where vLLM's LoRA kernels are slow: docs/training.md)",
    )


# Rollouts: 4 per prompt at the model's own distribution (temperature 1).
RolloutSampling = with_defaults(SamplingGroup, "RolloutSampling", n=4)


class TrainConfig(Group):
    """Every knob of `opd train` (its flags are generated from these fields)."""

    cli: ClassVar[CliSpec] = CliSpec(
        nested={
            "student": "",
            "teacher": "teacher_",
            "data": "",
            "sampling": "",
            "objective": "",
            "optim": "",
            "eval": "eval_",
            "eval.sampling": "eval_",
            "episodes": "",
            "horizon": "horizon_",
            "reanchor": "reanchor_",
            "lora": "lora_",
        },
        rename={
            "horizon.rule": "horizon",
            "reanchor.written_as": "reanchor_as",
            "episodes.env_args": "env_arg",
            "teacher.named": "teacher",
            "teacher.route": "route",
            "teacher.allow_tokenizer_mismatch": "allow_tokenizer_mismatch",
            "teacher.cross_tokenizer": "cross_tokenizer",
            "sampling.n": "n_rollouts",
            "sampling.max_tokens": "max_new_tokens",
            "eval.data": "eval_set",
            "eval.sampling.max_tokens": "eval_max_new_tokens",
        },
        env={"teacher.api_key": "OPD_API_KEY"},
    )

    student: StudentGroup
    teacher: TrainTeachers
    data: DataGroup = Field(default_factory=DataGroup)
    sampling: RolloutSampling = Field(default_factory=RolloutSampling)  # type: ignore[valid-type]
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimGroup = Field(default_factory=OptimGroup)
    eval: InTrainingEval = Field(default_factory=InTrainingEval)
    episodes: EpisodeGroup = Field(default_factory=EpisodeGroup)
    horizon: HorizonGroup = Field(default_factory=HorizonGroup)
    reanchor: ReanchorGroup = Field(default_factory=ReanchorGroup)
    lora: LoraGroup = Field(default_factory=LoraGroup)

    student_top_k: int = Field(default=16, ge=1, description="K: candidate ids per position")
    teacher_top_k: int = Field(default=16, ge=1, description="teacher top-k for diagnostics")
    candidates: Literal["sampler", "trainer"] = Field(
        default="sampler",
        description="where a step's candidate ids (the student's top-K the teacher scores) "
        "come from: the rollout engine, with one student forward per step (the loss pass "
        "records the rest), or a statistics pass of the trainer's before scoring (two forwards; "
        "always so with a teacher of another tokenizer)",
    )
    diagnostics: bool = Field(
        default=True,
        description="the method's diagnostics every step; off: the teacher is asked only for "
        "what the objective needs, and only kl/sampled is logged",
    )
    depth_bucket: int | None = Field(
        default=1024, ge=1, description="completion tokens per depth bucket"
    )
    seed: int = Field(default=0, description="seed of data order and sampling")
    max_steps: int = Field(default=100, ge=1, description="optimizer-step budget")
    run_dir: str = Field(default="runs/opd", description="metrics, logs, checkpoints")
    checkpoint_every: int = Field(default=50, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(default=2, ge=1, description="checkpoints kept")
    resume: str | None = Field(
        default=None,
        description="'latest', a checkpoint folder, or 'auto' (latest if any, else fresh)",
    )
    save_rollouts: bool = Field(
        default=False, description="write every step's rollouts to RUN_DIR/rollouts (Parquet)"
    )
    logger: list[LoggerName] = Field(
        default_factory=lambda: list(DEFAULT_LOGGERS),
        description="metric loggers (repeatable): jsonl (always on: resume and reports read "
        "it), tensorboard, wandb, mlflow, trackio",
    )

    @model_validator(mode="after")
    def _lora_alone(self) -> TrainConfig:
        """FSDP shards whole weights; adapters beside sharded frozen weights are not tested."""
        if self.lora.rank and self.optim.fsdp:
            raise ValueError("lora_rank: LoRA students train without --fsdp (use DDP)")
        return self

    @model_validator(mode="after")
    def _reanchor_needs_episodes(self) -> TrainConfig:
        """Re-anchoring has the teacher write turns: only episodes have turns to write."""
        if self.reanchor.prob > 0 and self.episodes.env is None:
            raise ValueError("reanchor_prob: the teacher writes turns of episodes; set --env")
        return self

    @model_validator(mode="after")
    def _eval_follows_rollouts(self) -> TrainConfig:
        """In-training evaluation answers as long and at the top-p the rollouts use unless
        told otherwise; resolved here so that config.json holds the values used."""
        given = self.eval.sampling.model_fields_set
        updates = {
            key: getattr(self.sampling, key) for key in ("max_tokens", "top_p") if key not in given
        }
        if updates:
            sampling = self.eval.sampling.model_copy(update=updates)
            sampling.model_fields_set.update(updates)
            self.eval = self.eval.model_copy(update={"sampling": sampling})
        return self


# The TrainConfig options a recipe's OPD stage may set (opd coldstart), by flag name: the same
# declarations, so a default or a bound changes in one place.
OPD_STAGE_FLAGS = (
    "objective",
    "topk_variant",
    "lr",
    "lr_schedule",
    "warmup_steps",
    "max_new_tokens",
    "n_rollouts",
    "prompts_per_step",
    "temperature",
    "top_p",
    "student_top_k",
    "teacher_top_k",
    "micro_batch_size",
    "checkpoint_every",
    "rollout_engine",
    "save_rollouts",
)

OPDStage = flag_model(
    "OPDStage",
    TrainConfig,
    OPD_STAGE_FLAGS,
    "OPD stage: TrainConfig's own options for a recipe's OPD run; the rest the recipe sets.",
)
