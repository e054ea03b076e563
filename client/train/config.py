"""TrainConfig: every knob of `opd train` in one typed object, logged whole at start.

Each option is declared here once, with its default and its help: `opd train`'s flags are
generated from these fields (opd.client.config_cli), and `opd coldstart`'s OPD stage reuses a
subset of them (`OPDStage`). Defaults follow the paper (docs/method.md): student top-k with
k = 16, rollout temperature 1.0 and top-p 1.0, 4 rollouts per prompt, lr 1e-6, token-mean loss,
no KL-to-reference, no entropy bonus; PPO-style clipping only when rollouts are reused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from opd.client.teacher.base import DEFAULT_MAX_WAIT_S
from opd.client.train.objectives import OBJECTIVES, ObjectiveConfig
from opd.client.train.pipeline import TeacherSpec
from opd.client.train.routing import parse_pairs

# The registry's names as a type, so the CLI offers them as choices.
ObjectiveName = Literal[OBJECTIVES]  # type: ignore[valid-type]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # --- who
    student: str = Field(description="student model folder (AutoModelForCausalLM)")
    teacher_url: list[str] = Field(
        default_factory=list,
        description="teacher service URL; repeat for replicas of one teacher",
    )
    teacher: list[str] = Field(
        default_factory=list,
        description="a named teacher, NAME=URL[,URL...] (its replicas); repeat for multi-teacher "
        "OPD, where each prompt's rollouts are scored by its own teacher (--teacher-field, "
        "--route, --teacher-prompts)",
    )
    teacher_field: str = Field(
        default="teacher", description="multi-teacher: the prompt column naming its teacher"
    )
    route: list[str] = Field(
        default_factory=list,
        description="multi-teacher: VALUE=TEACHER sends prompts whose --teacher-field is VALUE "
        "to TEACHER (repeatable)",
    )
    teacher_prompts: list[str] = Field(
        default_factory=list,
        description="multi-teacher: TEACHER=FILE, every prompt of FILE goes to TEACHER "
        "(repeatable; --prompts, when given, is added and routed by its column)",
    )
    teacher_weight: list[str] = Field(
        default_factory=list,
        description="multi-teacher: TEACHER=W scales that teacher's tokens in the loss "
        "(default 1; the loss stays one token mean over the step)",
    )
    api_key: str | None = Field(default=None, description="teacher API key (OPD_API_KEY)")
    allow_tokenizer_mismatch: bool = Field(
        default=False, description="skip the check that teacher and student share a tokenizer"
    )
    teacher_wait_s: float = Field(
        default=DEFAULT_MAX_WAIT_S,
        gt=0,
        description="how long a teacher request keeps being retried while the teacher is "
        "unreachable, loading or overloaded (a restarting pod) before the run fails",
    )

    # --- data
    prompts: str = Field(default="shipped", description="JSONL, Parquet, HF folder or 'shipped'")
    prompt_field: str = Field(default="prompt", description="field holding the prompt text")
    shuffle: bool = Field(default=True, description="shuffle prompts each epoch")
    holdout: int = Field(
        default=0, ge=0, description="last N prompts kept out of training (for evaluation)"
    )
    seed: int = Field(default=0, description="seed of data order and sampling")
    epochs: int | None = Field(default=None, ge=1, description="stop after this many epochs")
    max_steps: int = Field(default=100, ge=1, description="optimizer-step budget")

    # --- rollouts
    prompts_per_step: int = Field(default=4, ge=1, description="prompts per step")
    n_rollouts: int = Field(default=4, ge=1, description="completions per prompt")
    temperature: float = Field(
        default=1.0, ge=0, description="rollout temperature (0 = greedy, for checks)"
    )
    top_p: float = Field(default=1.0, gt=0, le=1, description="rollout top-p")
    max_new_tokens: int = Field(default=256, ge=1, description="max completion tokens")
    student_top_k: int = Field(default=16, ge=1, description="K: candidate ids per position")
    teacher_top_k: int = Field(default=16, ge=1, description="teacher top-k for diagnostics")

    rollout_engine: Literal["hf", "vllm"] = Field(
        default="hf",
        description="who samples: hf (generate on the trainer's module, batched) or vllm "
        "(an in-process vLLM engine, synced in memory after every optimizer step)",
    )
    hf_max_sequences: int = Field(
        default=64,
        ge=1,
        description="hf engine: sequences per generate call (prompts x n; bounds the KV cache)",
    )
    vllm_gpu_memory_utilization: float = Field(
        default=0.3, gt=0, lt=1, description="vllm engine: its share of GPU memory"
    )
    vllm_sleep: bool = Field(
        default=True, description="vllm engine on GPU: free its memory while the trainer updates"
    )
    save_rollouts: bool = Field(
        default=False, description="write every step's rollouts to RUN_DIR/rollouts (Parquet)"
    )

    # --- outcome evaluation (opd.client.evaluation.in_training)
    eval_set: str | None = Field(
        default=None,
        description="questions with answers (JSONL, Parquet, HF folder or task:NAME): accuracy "
        "before training, every --eval-every steps and at the end, with the teacher's "
        "accuracy and the gap recovery rate",
    )
    eval_every: int = Field(default=50, ge=1, description="steps between evaluations")
    eval_prompt_field: str = Field(default="prompt", description="eval set: question field")
    eval_answer_field: str = Field(default="answer", description="eval set: gold answer field")
    eval_verifier: str = Field(
        default="math",
        description="math, exact, numeric, regex:PATTERN, regex-numeric:PATTERN or module:function",
    )
    eval_limit: int | None = Field(
        default=128, ge=1, description="a seeded subset of this many questions (None: all)"
    )
    eval_n: int = Field(default=1, ge=1, description="samples per question")
    eval_temperature: float = Field(default=0.0, ge=0, description="0 = greedy")
    eval_max_new_tokens: int | None = Field(
        default=None, ge=1, description="max answer tokens (default: --max-new-tokens)"
    )
    eval_teacher: bool = Field(
        default=True,
        description="measure the teacher's accuracy once (POST /v1/generate) for the gap "
        "recovery rate",
    )

    # --- objective (opd.client.train.objectives.REGISTRY)
    objective: ObjectiveName = Field(default="student-topk", description="the OPD objective")
    topk_variant: Literal["released", "renormalized"] = Field(
        default="released", description="student-topk: released code or paper equation"
    )
    discount: float = Field(
        default=0.0, ge=0, le=1, description="sampled objective: discount factor"
    )
    clip_eps: float | None = Field(
        default=None, gt=0, description="PPO ratio clip (stale rollouts, ppo_epochs > 1)"
    )
    ppo_epochs: int = Field(default=1, ge=1, description="optimizer steps per rollout batch")
    tail: bool = Field(default=True, description="tail bucket for teacher-topk / jsd")
    jsd_beta: float = Field(default=0.5, ge=0, le=1, description="beta of jsd")
    diagnostics: bool = Field(
        default=True,
        description="the method's diagnostics every step; off: the teacher is asked only for "
        "what the objective needs, and only kl/sampled is logged",
    )

    # --- optimisation
    lr: float = Field(default=1e-6, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    adam_betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        default="constant", description="learning-rate schedule after warmup"
    )
    warmup_steps: int = Field(default=0, ge=0, description="linear warmup steps")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="gradient clipping")
    micro_batch_size: int = Field(default=8, ge=1, description="sequences per backward pass")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="student dtype"
    )
    device: str = Field(default="cpu", description="cpu, cuda, cuda:N")
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

    # --- bookkeeping
    run_dir: str = Field(default="runs/opd", description="metrics, TensorBoard, checkpoints")
    checkpoint_every: int = Field(default=50, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(default=2, ge=1, description="checkpoints kept")
    resume: str | None = Field(
        default=None,
        description="'latest', a checkpoint folder, or 'auto' (latest if any, else fresh)",
    )
    depth_bucket: int | None = Field(
        default=1024, ge=1, description="completion tokens per depth bucket"
    )
    tensorboard: bool = Field(default=True, description="also log to TensorBoard")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        self.objective_config().validate()
        if self.eval_set is not None and self.eval_n > 1 and self.eval_temperature == 0:
            raise ValueError("eval_n > 1 needs eval_temperature > 0 (greedy samples are identical)")
        return self

    @model_validator(mode="after")
    def _teachers(self) -> TrainConfig:
        """One way to name the teachers, every name once, and every rule naming one of them:
        a typo in a routing flag fails here, before any model is loaded."""
        if bool(self.teacher_url) == bool(self.teacher):
            raise ValueError("give the teacher as --teacher-url URL or as --teacher NAME=URL")
        names = [name for name, _ in self.teacher_specs()]
        if len(set(names)) != len(names):
            raise ValueError(f"--teacher: a name given twice ({', '.join(names)})")
        if self.teacher and any(n is None for n in names):
            raise ValueError("--teacher: name every teacher (NAME=URL[,URL...])")
        known = set(names)
        for flag, items in (
            ("--teacher-prompts", self.teacher_prompts),
            ("--teacher-weight", self.teacher_weight),
        ):
            for key in parse_pairs(items, flag):
                if key not in known:
                    raise ValueError(f"{flag}: no teacher named {key!r}")
        for name, value in parse_pairs(self.teacher_weight, "--teacher-weight").items():
            try:
                weight = float(value)
            except ValueError:
                weight = -1.0
            if not weight >= 0:
                raise ValueError(f"--teacher-weight {name}={value}: expected a number >= 0")
        if (self.route or self.teacher_prompts) and not self.teacher:
            raise ValueError("--route and --teacher-prompts need named teachers (--teacher)")
        return self

    def teacher_specs(self) -> list[tuple[str | None, list[str]]]:
        """(name, replica URLs) per teacher; name None for a plain --teacher-url teacher."""
        if self.teacher_url:
            return [(None, list(self.teacher_url))]
        specs = [TeacherSpec.model_validate(item) for item in self.teacher]
        return [(spec.name, spec.urls) for spec in specs]

    def teacher_weights(self) -> dict[str, float]:
        return {k: float(v) for k, v in parse_pairs(self.teacher_weight, "").items()}

    def objective_config(self) -> ObjectiveConfig:
        return ObjectiveConfig(
            name=self.objective,
            topk_variant=self.topk_variant,
            discount=self.discount,
            clip_eps=self.clip_eps,
            tail=self.tail,
            jsd_beta=self.jsd_beta,
        )


# The TrainConfig fields a recipe's OPD stage may set (opd coldstart): the same declarations,
# picked by name, so a default or a bound changes in one place.
OPD_STAGE_FIELDS = (
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

OPDStage = create_model(
    "OPDStage",
    __config__=ConfigDict(extra="forbid"),
    __doc__="The OPD stage of a recipe: TrainConfig's own fields, the rest set by the recipe.",
    **{
        name: (TrainConfig.model_fields[name].annotation, TrainConfig.model_fields[name])
        for name in OPD_STAGE_FIELDS
    },
)
