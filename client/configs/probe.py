"""ProbeConfig: every knob of `opd probe` (its flags are generated from these fields)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from opd.client.configs.groups import (
    PROMPTS_HELP,
    VERIFIER_HELP,
    EpisodeGroup,
    Group,
    HorizonKnobs,
    SamplingGroup,
    StudentGroup,
    TeacherConnection,
    TeacherSpec,
)
from opd.shared.config_cli import CliSpec


class DepthProbe(Group):
    """Depth probe: teacher and student continue student prefixes; the teacher's accuracy
    advantage by prefix length (needs --answer-field)."""

    enabled: bool = Field(
        default=False,
        description="teacher-continuation depth probe: teacher and student continue student "
        "prefixes; the teacher's accuracy advantage by prefix length (needs --answer-field)",
    )
    prefixes: list[int] = Field(
        default_factory=lambda: [0, 8, 16, 32],
        description="depth probe: prefix lengths in completion tokens, or with --env turn "
        "indices (continue from turn j) (repeat the flag)",
        json_schema_extra={"cli_name": "prefix"},
    )
    samples: int = Field(
        default=4, ge=1, description="depth probe: continuations per prefix and model"
    )
    temperature: float | None = Field(
        default=None,
        ge=0,
        description="depth probe: continuation temperature (default: --temperature; 0 = greedy)",
    )
    rollouts: int = Field(
        default=64, ge=1, description="depth probe: rollouts continued (a seeded subset)"
    )

    @model_validator(mode="after")
    def _prefixes(self) -> DepthProbe:
        if any(p < 0 for p in self.prefixes) or not self.prefixes:
            raise ValueError("depth_prefixes: one or more lengths >= 0")
        return self


class ProbeConfig(Group):
    """Every knob of `opd probe` (its flags are generated from these fields)."""

    cli: ClassVar[CliSpec] = CliSpec(
        nested={
            "student": "",
            "connection": "",
            "sampling": "",
            "depth": "depth_",
            "episodes": "",
            "horizon": "horizon_",
        },
        rename={
            "episodes.env_args": "env_arg",
            "connection.wait_s": "teacher_wait_s",
            "sampling.n": "n_rollouts",
            "sampling.max_tokens": "max_new_tokens",
            "depth.enabled": "depth",
        },
        env={"connection.api_key": "OPD_API_KEY"},
    )

    student: StudentGroup
    teachers: list[TeacherSpec] = Field(
        min_length=1,
        description="one teacher per flag, [NAME=]URL[,URL...] (replicas comma-separated); "
        "repeat to compare",
        json_schema_extra={"cli_name": "teacher"},
    )
    connection: TeacherConnection = Field(default_factory=TeacherConnection)
    sampling: SamplingGroup = Field(default_factory=SamplingGroup)
    depth: DepthProbe = Field(default_factory=DepthProbe)
    episodes: EpisodeGroup = Field(default_factory=EpisodeGroup)
    # The adaptive horizon rule's knobs (as `opd train --horizon adaptive` reads them): the
    # probe applies the rule once to its rollouts and recommends a horizon per teacher.
    horizon: HorizonKnobs = Field(default_factory=HorizonKnobs)
    prompts: str = Field(default="shipped", description=PROMPTS_HELP)
    prompt_field: str = Field(default="prompt", description="field holding the prompt text")
    num_prompts: int = Field(default=256, ge=1, description="prompts sampled from the set")
    save_rollouts: bool = Field(
        default=True, description="write the scored rollouts to OUT_DIR/rollouts (Parquet)"
    )
    student_top_k: int = Field(default=16, ge=1, description="K: the student's top-k")
    teacher_top_k: int = Field(default=16, ge=1, description="k: the teacher's top-k")
    depth_bucket: int = Field(default=256, ge=1, description="completion tokens per depth bucket")
    seed: int = Field(default=0, description="prompt subset and sampling seed")
    out_dir: str = Field(default="runs/probe", description="where probe.json goes")
    domain_field: str | None = Field(
        default=None,
        description="a prompt column naming each prompt's domain: teachers are also ranked per "
        "domain, and opd train routing flags (--route DOMAIN=TEACHER) are suggested",
    )
    answer_field: str | None = Field(
        default=None,
        description="field holding the gold answer: adds the student's accuracy and each "
        "teacher's reward AUROC (sequence mean reward against answer correctness)",
    )
    verifier: str = Field(default="math", description="with --answer-field: " + VERIFIER_HELP)

    @model_validator(mode="after")
    def _check(self) -> ProbeConfig:
        if self.depth.enabled and self.answer_field is None and self.episodes.env is None:
            raise ValueError(
                "depth: the depth probe grades answers; give --answer-field (or --env, whose "
                "rewards grade episodes)"
            )
        return self
