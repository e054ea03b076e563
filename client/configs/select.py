"""SelectConfig: every knob of `opd select-prompts`, recorded whole in the summary (minus the
API key)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from opd.client.configs.groups import (
    Group,
    SamplingGroup,
    StudentRuntime,
    TeacherConnection,
    with_defaults,
)
from opd.client.recipes.prompt_embeddings import EmbedderName
from opd.client.recipes.prompt_selection import SelectionError
from opd.shared.config_cli import CliSpec

RankBy = Literal["likelihood", "overlap", "combined"]
# Short student rollouts are enough to measure the overlap of a prompt's answers.
SelectSampling = with_defaults(SamplingGroup, "SelectSampling", max_tokens=48)


class SelectConfig(Group):
    """Every knob of `opd select-prompts`, recorded whole in the summary (minus the API key)."""

    cli: ClassVar[CliSpec] = CliSpec(
        nested={"student_options": "", "connection": "", "sampling": ""},
        rename={
            "connection.wait_s": "teacher_wait_s",
            "sampling.n": "rollouts",
            "sampling.max_tokens": "max_new_tokens",
        },
        env={"connection.api_key": "OPD_API_KEY"},
    )

    pool: str = Field(description="prompt pool: JSONL, Parquet or HF folder")
    out: str = Field(description="output file, .jsonl or .parquet")
    count: int | None = Field(
        default=None, ge=1, description="prompts to select, aligned + OOD; default: all left"
    )
    teacher_url: list[str] = Field(
        min_length=1, description="teacher service URL; repeat for replicas of one teacher"
    )
    connection: TeacherConnection = Field(default_factory=TeacherConnection)
    teacher_name: str | None = Field(
        default=None,
        description="multi-teacher OPD: write this teacher's name into every selected row's "
        "--teacher-field column, so that opd train routes the set to it",
    )
    teacher_field: str = Field(
        default="teacher", description="with --teacher-name: the column that names the teacher"
    )
    prompt_field: str = Field(default="prompt", description="field holding the prompt text")
    student: str | None = Field(default=None, description="student folder: adds the overlap score")
    student_options: StudentRuntime = Field(default_factory=StudentRuntime)
    sampling: SelectSampling = Field(default_factory=SelectSampling)  # type: ignore[valid-type]
    tokenizer: str | None = Field(
        default=None, description="tokenizer folder (default: the student's)"
    )
    dedupe_against: list[str] = Field(
        default_factory=list, description="drop pool prompts found in this set (repeatable)"
    )
    ood: str | None = Field(
        default=None, description="OOD prompts file; default: the pool's least aligned"
    )
    ood_fraction: float = Field(default=0.1, ge=0, le=1, description="share of OOD in --count")
    rank_by: RankBy | None = Field(
        default=None, description="ranking score (default: combined with --student)"
    )
    embedder: EmbedderName = Field(
        default="auto", description="near-dup embedder (auto: minilm if installed)"
    )
    near_dup_threshold: float | None = Field(
        default=None,
        ge=-1,
        le=1,
        description="cosine >= this is a near duplicate (default: minilm 0.6, lexical 0.4)",
    )
    seed: int = Field(default=0, description="seed of OOD sampling and student rollouts")
    max_prompt_tokens: int | None = Field(
        default=None, ge=2, description="skip longer rendered prompts (default: teacher's limit)"
    )
    top_k: int = Field(default=16, ge=1, description="student and teacher top-k of the overlap")

    def tokenizer_path(self) -> str:
        """The teacher's chat template and vocabulary come from here: --tokenizer, else the
        student (which must share the teacher's tokenizer anyway)."""
        path = self.tokenizer or self.student
        if not path:
            raise SelectionError(
                "give --student or --tokenizer: the teacher's chat template comes from it"
            )
        return path

    def resolved_rank_by(self) -> RankBy:
        if self.rank_by is None:
            return "combined" if self.student else "likelihood"
        if self.rank_by != "likelihood" and not self.student:
            raise SelectionError(f"--rank-by {self.rank_by} needs --student (for the overlap)")
        return self.rank_by
