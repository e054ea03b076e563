"""The option groups every student-side command composes: declared once, used by all.

A group is a pydantic model; a command's config holds it as a field (TrainConfig.sampling), the
CLI turns its fields into flags with the command's prefix (opd.shared.config_cli), and a config
file nests it under its name. Defaults that differ between commands (a probe samples at
temperature 1, an evaluation greedily) are set with `with_defaults`, which keeps the field's
declaration, bounds and help and changes only its default.

Groups:
- StudentRuntime / StudentGroup: the student model, dtype, device and rollout engine;
- SamplingGroup: n, temperature, top-p, max tokens, mapped to the wire's GenerateOptions in
  one place (`options`);
- TeacherConnection / TrainTeachers: how a command reaches its teachers, and a training run's
  teachers with their routing;
- ObjectiveConfig: the OPD objective and its knobs (the trainer reads it as it is);
- EvalOptions: the questions-with-answers options `opd eval`, `opd probe` and in-training
  evaluation share;
- EpisodeGroup: multi-turn episodes with an environment (opd.client.episodes) and their limits.
- HorizonKnobs / HorizonGroup: how deep the teacher scores and the student trains (--horizon;
  the probe takes the knobs of the adaptive rule only); ReanchorGroup: the teacher writes some
  episode turns on a decaying schedule (--reanchor-prob).
Nothing here imports torch: `opd train --help` builds its flags from these without it.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from opd.client.teacher.base import DEFAULT_MAX_WAIT_S
from opd.shared.schemas import GenerateOptions

Dtype = Literal["float32", "bfloat16", "float16"]
EngineName = Literal["hf", "vllm"]
# The objectives' names; opd.client.train.objectives.REGISTRY holds one entry per name (its
# import checks that the two agree).
OBJECTIVES = ("sampled", "student-topk", "teacher-topk", "jsd", "overlap-topk")
ObjectiveName = Literal["sampled", "student-topk", "teacher-topk", "jsd", "overlap-topk"]
TOPK_VARIANTS = ("released", "renormalized")
# The ObjectiveConfig knobs each objective reads (the registry's entries take them from here).
OBJECTIVE_KNOBS: dict[str, frozenset[str]] = {
    "sampled": frozenset({"discount", "clip_eps"}),
    "student-topk": frozenset({"topk_variant", "clip_eps"}),
    "teacher-topk": frozenset({"tail"}),
    "jsd": frozenset({"tail", "jsd_beta"}),
    "overlap-topk": frozenset({"clip_eps"}),
}
# A prompt set: a JSONL / Parquet file, an HF dataset folder, or the set shipped with opd.
PROMPTS_HELP = "JSONL, Parquet, HF folder or 'shipped'"
VERIFIER_HELP = (
    "math (math-verify), exact, numeric, regex:PATTERN, regex-numeric:PATTERN or module:function"
)

M = TypeVar("M", bound=BaseModel)


class Group(BaseModel):
    """Base of every option group: unknown keys are errors (a typo in a config file fails)."""

    model_config = ConfigDict(extra="forbid")


def with_defaults(model: type[M], name: str | None = None, **defaults: Any) -> type[M]:
    """`model` with other defaults for some fields: same declarations, bounds and help."""
    fields: dict[str, Any] = {}
    for field_name, value in defaults.items():
        info = model.model_fields[field_name]
        copy = info._copy()  # noqa: SLF001 (pydantic's own way to derive a FieldInfo)
        copy.default, copy.default_factory = value, None
        fields[field_name] = (info.annotation, copy)
    return create_model(  # type: ignore[call-overload,no-any-return]
        name or model.__name__, __base__=model, __doc__=model.__doc__, **fields
    )


class TeacherSpec(BaseModel):
    """One teacher on the command line: `[NAME=]URL[,URL...]` (the URLs are its replicas).

    `--teacher-url` always means replicas of one teacher; commands that compare or combine
    separate teachers take `--teacher`, one per teacher, in this form."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(default=None, description="display name; default: the model's")
    urls: list[str] = Field(min_length=1, description="replica URLs of this teacher")

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        name, sep, rest = value.partition("=")
        if not sep or "://" in name:
            name, rest = None, value
        urls = [u.strip() for u in rest.split(",") if u.strip()]
        if not urls:
            raise ValueError(f"teacher {value!r}: expected [NAME=]URL[,URL...]")
        return {"name": name.strip() if name else None, "urls": urls}


class StudentRuntime(Group):
    """Student: how the student runs and samples."""

    dtype: Dtype = Field(default="float32", description="student dtype")
    device: str = Field(default="cpu", description="student device: cpu, cuda, cuda:N")
    rollout_engine: EngineName = Field(
        default="hf",
        description="who samples the student: hf (generate on the trainer's module, batched) or "
        "vllm (an in-process vLLM engine; in training, synced in memory after every step)",
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


class StudentGroup(StudentRuntime):
    """Student: the model, and how it runs and samples."""

    model: str = Field(
        description="student model folder (AutoModelForCausalLM)",
        json_schema_extra={"cli_name": "student"},
    )


class SamplingGroup(Group):
    """Sampling: completions per prompt, temperature, top-p, length."""

    n: int = Field(default=1, ge=1, description="completions per prompt")
    temperature: float = Field(
        default=1.0,
        ge=0,
        description="sampling temperature (0 = greedy)",
        validate_default=True,  # a greedy default with n > 1 is refused too
    )
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling mass")
    max_tokens: int = Field(default=256, ge=1, description="max completion tokens")

    @field_validator("temperature")
    @classmethod
    def _greedy_once(cls, temperature: float, info: ValidationInfo) -> float:
        """n > 1 greedy samples are identical (and HF generate refuses them): refused here,
        naming the temperature flag, before any model loads."""
        n = info.data.get("n", 1)
        if n > 1 and temperature == 0:
            raise ValueError(f"n={n} samples need temperature > 0 (greedy samples are identical)")
        return temperature

    def options(self, seed: int | None = None) -> GenerateOptions:
        """The wire's sampling options (POST /v1/generate and every rollout engine read it):
        prompt i samples with seed + i."""
        return GenerateOptions(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            seed=seed,
        )


class TeacherConnection(Group):
    """Teacher: how the command reaches its teachers."""

    api_key: str | None = Field(default=None, description="teacher API key (OPD_API_KEY)")
    allow_tokenizer_mismatch: bool = Field(
        default=False, description="skip the check that teachers and student share a tokenizer"
    )
    cross_tokenizer: Literal["off", "auto", "always"] = Field(
        default="off",
        description="teachers of another tokenizer: off = refused; auto = scored across "
        "tokenizers (text rendered and re-tokenized by the teacher, log-probs compared per "
        "aligned chunk), a teacher of the student's own tokenizer natively; always = every "
        "teacher through the cross-tokenizer path",
    )
    wait_s: float = Field(
        default=DEFAULT_MAX_WAIT_S,
        gt=0,
        description="how long a teacher request keeps being retried while the teacher is "
        "unreachable, loading or overloaded (a restarting pod) before the run fails",
    )


def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    """`KEY=VALUE` items as a dict (`--route algebra=math`, `--teacher-prompts math=f.jsonl`)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{what} {item!r}: expected KEY=VALUE")
        if key.strip() in out:
            raise ValueError(f"{what}: {key.strip()!r} given twice")
        out[key.strip()] = value.strip()
    return out


class EpisodeGroup(Group):
    """Episodes: the student talks to an environment turn by turn (docs/environments.md).

    Unset `env`: one completion per prompt, as always. The per-turn token cap is the sampling
    group's max tokens (--max-new-tokens); a turn that hits it, the turn cap or the episode's
    token budget ends its episode, counted as truncated."""

    env: str | None = Field(
        default=None,
        description="environment: calculator, followup, module:Class, trl:module:Class or "
        "tools:module:fn1,fn2 (unset: single completions)",
    )
    env_args: list[str] = Field(
        default_factory=list,
        description="KEY=VALUE for the environment's constructor (repeatable; VALUE read as "
        "JSON when it parses, else as a string)",
    )
    max_turns: int = Field(default=8, ge=1, description="assistant turns per episode, at most")
    max_episode_tokens: int = Field(
        default=2048,
        ge=1,
        description="tokens an episode may add after its opening prompt (assistant turns and "
        "observations), at most",
    )

    def kwargs(self) -> dict[str, Any]:
        """--env-arg items as constructor keyword arguments (JSON values where they parse)."""
        import json

        out: dict[str, Any] = {}
        for key, value in parse_pairs(self.env_args, "--env-arg").items():
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value
        return out


class HorizonKnobs(Group):
    """Horizon: the knobs the adaptive horizon rule reads from one batch's per-depth top-k
    overlap (opd.client.train.horizon.recommend). Their own group so that `opd probe`, which
    applies the rule once to its rollouts to recommend a horizon, takes exactly these flags and
    not the training-only ones (the rule, smoothing, warm-up, regrowth)."""

    bucket: int = Field(
        default=128, ge=1, description="adaptive: depth tokens per bucket the rule reads"
    )
    fade: float = Field(
        default=0.8,
        gt=0,
        lt=1,
        description="adaptive: a bucket is faded below this share of the first bucket's overlap",
    )
    min_tokens: int = Field(
        default=32, ge=1, description="adaptive: positions a bucket needs in a step to count"
    )


class HorizonGroup(HorizonKnobs):
    """Horizon: how deep into a completion (or an episode) the teacher scores and the student
    trains (opd.client.train.horizon; docs/training.md, "Long horizons").

    `none` trains every position. `fixed:N` keeps positions at depth < N (tokens since the
    first completion token, an episode's context included); `fixed:Nturns` keeps the first N
    assistant turns. `adaptive` keeps what the running per-depth top-k overlap says still
    carries the teacher's signal: a depth bucket is faded when its smoothed overlap falls below
    `fade` times the first bucket's, and the horizon is the start of the first bucket from
    which every deeper bucket is faded; while none is, it grows one bucket every
    `regrow_steps` steps. bucket, fade and min_tokens come from HorizonKnobs."""

    rule: str = Field(
        default="none", description="none, fixed:N (tokens), fixed:Nturns or adaptive"
    )
    smoothing: float = Field(
        default=0.3,
        gt=0,
        le=1,
        description="adaptive: weight of the newest step in each bucket's moving average",
    )
    warmup_steps: int = Field(
        default=3, ge=0, description="adaptive: steps scored at full depth before any cut"
    )
    regrow_steps: int = Field(
        default=5,
        ge=0,
        description="adaptive: steps a bound holds before it may grow one bucket deeper",
    )

    @field_validator("rule")
    @classmethod
    def _rule(cls, value: str) -> str:
        parse_horizon(value)  # raises naming the rule and the forms it takes
        return value

    def parsed(self) -> tuple[str, int | None, int | None]:
        """(kind, tokens, turns): the rule's kind ("none", "fixed", "adaptive") and its bound."""
        return parse_horizon(self.rule)


def parse_horizon(rule: str) -> tuple[str, int | None, int | None]:
    """`none`, `fixed:N`, `fixed:Nturns`, `adaptive` -> (kind, tokens, turns); ValueError
    naming the rule otherwise."""
    if rule in ("none", "adaptive"):
        return rule, None, None
    kind, _, bound = rule.partition(":")
    turns = bound.endswith("turns")
    number = bound.removesuffix("turns")
    if kind != "fixed" or not re.fullmatch(r"[0-9]+", number) or int(number) < 1:
        raise ValueError(
            f"horizon: expected none, fixed:N, fixed:Nturns or adaptive (N >= 1), got {rule!r}"
        )
    return ("fixed", None, int(number)) if turns else ("fixed", int(number), None)


class ReanchorGroup(Group):
    """Teacher re-anchoring in episodes: from the second assistant turn on, the teacher writes
    a turn (POST /v1/generate on the exact ids so far) with a probability that decays linearly
    to 0 over `decay_steps` (docs/training.md, "Long horizons")."""

    prob: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="probability that the teacher writes a turn, at step 0 (0: off)",
    )
    decay_steps: int | None = Field(
        default=None,
        ge=1,
        description="steps over which the probability falls to 0 (default: max_steps)",
    )
    written_as: Literal["context", "target"] = Field(
        default="context",
        description="teacher-written turns are context only, or off-policy targets trained "
        "with their log-likelihood (never as student samples)",
    )


class TrainTeachers(TeacherConnection):
    """Teacher: the run's teachers, their routing, and how they are reached."""

    url: list[str] = Field(
        default_factory=list,
        description="teacher service URL; repeat for replicas of one teacher",
    )
    named: list[str] = Field(
        default_factory=list,
        description="a named teacher, NAME=URL[,URL...] (its replicas); repeat for multi-teacher "
        "OPD, where each prompt's rollouts are scored by its own teacher (--teacher-field, "
        "--route, --teacher-prompts)",
    )
    field: str = Field(
        default="teacher", description="multi-teacher: the prompt column naming its teacher"
    )
    route: list[str] = Field(
        default_factory=list,
        description="multi-teacher: VALUE=TEACHER sends prompts whose --teacher-field is VALUE "
        "to TEACHER (repeatable)",
    )
    prompts: list[str] = Field(
        default_factory=list,
        description="multi-teacher: TEACHER=FILE, every prompt of FILE goes to TEACHER "
        "(repeatable; --prompts, when given, is added and routed by its column)",
    )
    weight: list[str] = Field(
        default_factory=list,
        description="multi-teacher: TEACHER=W scales that teacher's tokens in the loss "
        "(default 1; the loss stays one token mean over the step)",
    )

    @model_validator(mode="after")
    def _teachers(self) -> TrainTeachers:
        """One way to name the teachers, every name once, and every rule naming one of them:
        a typo in a routing flag fails here, before any model is loaded."""
        if bool(self.url) == bool(self.named):
            raise ValueError("give the teacher as --teacher-url URL or as --teacher NAME=URL")
        names = [name for name, _ in self.specs()]
        if len(set(names)) != len(names):
            raise ValueError(f"--teacher: a name given twice ({', '.join(map(str, names))})")
        if self.named and any(n is None for n in names):
            raise ValueError("--teacher: name every teacher (NAME=URL[,URL...])")
        known = set(names)
        for flag, items in (("--teacher-prompts", self.prompts), ("--teacher-weight", self.weight)):
            for key in parse_pairs(items, flag):
                if key not in known:
                    raise ValueError(f"{flag}: no teacher named {key!r}")
        for name, value in parse_pairs(self.weight, "--teacher-weight").items():
            try:
                weight = float(value)
            except ValueError:
                weight = -1.0
            if not weight >= 0:
                raise ValueError(f"--teacher-weight {name}={value}: expected a number >= 0")
        if (self.route or self.prompts) and not self.named:
            raise ValueError("--route and --teacher-prompts need named teachers (--teacher)")
        return self

    def specs(self) -> list[tuple[str | None, list[str]]]:
        """(name, replica URLs) per teacher; name None for a plain --teacher-url teacher."""
        if self.url:
            return [(None, list(self.url))]
        return [(s.name, s.urls) for s in (TeacherSpec.model_validate(i) for i in self.named)]

    def weights(self) -> dict[str, float]:
        return {k: float(v) for k, v in parse_pairs(self.weight, "").items()}


class ObjectiveConfig(Group):
    """Objective: which OPD objective the trainer optimises and its knobs (paper defaults).

    name:         one of OBJECTIVES.
    topk_variant: "released" (thunlp/OPD code) or "renormalized" (paper equation); student-topk.
    discount:     gamma of discounted_advantages; sampled only; 0 = per-token reward.
    clip_eps:     PPO clip for stale rollouts; policy-gradient objectives only (sampled,
                  student-topk released, overlap-topk); None = no clipping.
    tail:         add the tail bucket to teacher-topk / jsd.
    jsd_beta:     beta of teacher_topk_jsd, in [0, 1] (0 forward KL, 1 reverse KL).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ObjectiveName = Field(
        default="student-topk",
        description="the OPD objective",
        json_schema_extra={"cli_name": "objective"},
    )
    topk_variant: Literal["released", "renormalized"] = Field(
        default="released", description="student-topk: released code or paper equation"
    )
    discount: float = Field(
        default=0.0, ge=0, le=1, description="sampled objective: discount factor"
    )
    clip_eps: float | None = Field(
        default=None, gt=0, lt=1, description="PPO ratio clip (stale rollouts, ppo_epochs > 1)"
    )
    tail: bool = Field(default=True, description="tail bucket for teacher-topk / jsd")
    jsd_beta: float = Field(default=0.5, ge=0, le=1, description="beta of jsd")

    @model_validator(mode="after")
    def _knobs(self) -> ObjectiveConfig:
        """Knobs that the chosen objective would silently ignore are errors too: a discount or
        a clip that does nothing is a misconfigured run, not a harmless default."""
        knobs = OBJECTIVE_KNOBS[self.name]
        for name, info in type(self).model_fields.items():
            if name == "name" or name in knobs or getattr(self, name) == info.default:
                continue
            raise ValueError(
                f"{name}: the {self.name!r} objective does not use {name} "
                f"(its knobs: {', '.join(sorted(knobs)) or 'none'})"
            )
        if self.clip_eps is not None and not self.policy_gradient():
            raise ValueError(
                f"clip_eps: applies to policy-gradient objectives only, not {self.name!r}"
                + (" (renormalized)" if self.name == "student-topk" else "")
            )
        return self

    def policy_gradient(self) -> bool:
        """Whether the loss is a ratio surrogate, where PPO clipping means something: sampled,
        overlap-topk, and student-topk in its released form (the paper's equation is not)."""
        if self.name == "student-topk":
            return self.topk_variant == "released"
        return self.name in ("sampled", "overlap-topk")


class EvalOptions(Group):
    """Evaluation: questions with answers, and how answers are graded."""

    prompt_field: str = Field(default="prompt", description="field holding the question")
    answer_field: str = Field(default="answer", description="field holding the gold answer")
    verifier: str = Field(default="math", description=VERIFIER_HELP)
    limit: int | None = Field(default=None, ge=1, description="a seeded subset of this many")


# Evaluation samples greedily by default: the accuracy of the model's most likely answer.
EvalSampling = with_defaults(SamplingGroup, "EvalSampling", temperature=0.0)


class InTrainingEval(EvalOptions):
    """Evaluation: accuracy on held-out questions during training (opd.client.evaluation)."""

    data: str | None = Field(
        default=None,
        description="questions with answers (JSONL, Parquet, HF folder or task:NAME): accuracy "
        "before training, every --eval-every steps and at the end, with the teacher's "
        "accuracy and the gap recovery rate",
    )
    every: int = Field(default=50, ge=1, description="steps between evaluations")
    limit: int | None = Field(
        default=128, ge=1, description="a seeded subset of this many questions (None: all)"
    )
    sampling: EvalSampling = Field(default_factory=EvalSampling)  # type: ignore[valid-type]
    teacher: bool = Field(
        default=True,
        description="measure the teacher's accuracy once (POST /v1/generate) for the gap "
        "recovery rate",
    )
