"""EvalConfig: every knob of `opd eval` (its flags are generated from these fields)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from opd.client.configs.groups import (
    EpisodeGroup,
    EvalOptions,
    EvalSampling,
    Group,
    StudentRuntime,
    TeacherConnection,
    TeacherSpec,
)
from opd.shared.config_cli import CliSpec


class EvalConfig(Group):
    """Every knob of `opd eval` (its flags are generated from these fields)."""

    cli: ClassVar[CliSpec] = CliSpec(
        nested={"eval": "", "sampling": "", "student": "", "connection": "", "episodes": ""},
        rename={"connection.wait_s": "teacher_wait_s", "episodes.env_args": "env_arg"},
        env={"connection.api_key": "OPD_API_KEY"},
    )

    data: str = Field(
        description="questions with answers: JSONL, Parquet, HF folder, or task:NAME "
        "(generated; opd.client.evaluation.tasks)"
    )
    eval: EvalOptions = Field(default_factory=EvalOptions)
    students: list[str] = Field(
        default_factory=list,
        description="student model folder, run checkpoint or run dir (repeat to compare; the "
        "first is 'before' for the gap recovery rate)",
        json_schema_extra={"cli_name": "student"},
    )
    teachers: list[TeacherSpec] = Field(
        default_factory=list,
        description="teacher service [NAME=]URL[,URL...], answering via /v1/generate (repeat)",
        json_schema_extra={"cli_name": "teacher"},
    )
    student: StudentRuntime = Field(default_factory=StudentRuntime)
    connection: TeacherConnection = Field(default_factory=TeacherConnection)
    sampling: EvalSampling = Field(default_factory=EvalSampling)  # type: ignore[valid-type]
    episodes: EpisodeGroup = Field(default_factory=EpisodeGroup)
    k: int | None = Field(default=None, ge=1, description="pass@k (default: n)")
    seed: int = Field(default=0, description="subset and sampling seed (prompt i: seed + i)")
    interval: Literal["bootstrap", "wilson"] = Field(
        default="wilson", description="95% interval: Wilson (counts) or bootstrap over prompts"
    )
    out_dir: str = Field(default="runs/eval", description="where eval.json and per-prompt files go")

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if not self.students and not self.teachers:
            raise ValueError("give at least one --student or --teacher to evaluate")
        n = self.sampling.n  # n > 1 at temperature 0 is refused by the sampling group
        if self.k is not None and self.k > n:
            raise ValueError(f"k={self.k} must be <= n={n}")
        if self.episodes.env is not None and not self.students:
            raise ValueError(
                "env: episodes are rendered with a student's tokenizer; give a --student "
                "(a teacher of another tokenizer plays in its own with --cross-tokenizer auto)"
            )
        return self
