"""ColdstartConfig: every knob of `opd coldstart` (its flags are generated from these fields):
the teacher's sampling, the filters, the SFT stage (`--sft-*`), and the OPD stage (`--opd-*`,
a typed part of TrainConfig)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from opd.client.configs.groups import (
    PROMPTS_HELP,
    EpisodeGroup,
    Group,
    SamplingGroup,
    StudentGroup,
    TeacherConnection,
    with_defaults,
)
from opd.client.configs.train import OPDStage
from opd.client.recipes.coldstart_filters import FilterConfig
from opd.shared.config_cli import CliSpec


class SFTConfig(Group):
    """SFT stage: the cold start's supervised step (the paper's recipe: 1-2 epochs, lr 1e-5,
    cosine, 5% warmup)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=1, ge=1, description="SFT epochs")
    lr: float = Field(default=1e-5, gt=0, description="SFT learning rate")
    lr_schedule: Literal["cosine", "constant"] = Field(
        default="cosine", description="SFT schedule after warmup"
    )
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1, description="SFT warmup share of steps")
    batch_size: int = Field(default=8, ge=1, description="SFT sequences per step")
    max_len: int = Field(default=2048, ge=2, description="longest SFT example (tokens)")
    weight_decay: float = Field(default=0.0, ge=0, description="SFT AdamW weight decay")
    max_grad_norm: float = Field(default=1.0, gt=0, description="SFT gradient clipping")
    seed: int = Field(default=0, description="SFT data order seed (default: the recipe's seed)")


# The teacher answers as the paper's cold start samples it.
TeacherSampling = with_defaults(
    SamplingGroup, "TeacherSampling", temperature=0.7, top_p=0.95, max_tokens=1024
)


class ColdstartConfig(Group):
    """Every knob of `opd coldstart` (its flags are generated from these fields)."""

    cli: ClassVar[CliSpec] = CliSpec(
        nested={
            "student": "",
            "connection": "",
            "sampling": "",
            "filters": "",
            "sft": "sft_",
            "opd": "opd_",
            "episodes": "",
        },
        rename={"connection.wait_s": "teacher_wait_s", "episodes.env_args": "env_arg"},
        env={"connection.api_key": "OPD_API_KEY"},
        exclude=("sft.seed",),
    )

    student: StudentGroup
    teacher_url: list[str] = Field(
        min_length=1, description="teacher service URL; repeat for replicas of one teacher"
    )
    connection: TeacherConnection = Field(default_factory=TeacherConnection)
    prompts: str = Field(default="shipped", description=PROMPTS_HELP)
    prompt_field: str = Field(default="prompt", description="field holding the prompt text")
    sft_fraction: float = Field(
        default=0.5, gt=0, lt=1, description="share of prompts used for SFT (the rest: OPD)"
    )
    seed: int = Field(default=0, description="split and sampling seed")
    sampling: TeacherSampling = Field(default_factory=TeacherSampling)  # type: ignore[valid-type]
    filters: FilterConfig = Field(default_factory=FilterConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    dataset_format: Literal["jsonl", "parquet"] = Field(
        default="jsonl", description="format of the SFT data set"
    )
    out_dir: str = Field(default="runs/coldstart", description="data set, split, student, metrics")
    # OPD afterwards, on the held-out prompts (0 = stop after SFT and print the command)
    opd_steps: int = Field(
        default=0, ge=0, description="then OPD steps on the held-out prompts (0: print the command)"
    )
    opd: OPDStage = Field(default_factory=OPDStage)  # type: ignore[valid-type]
    episodes: EpisodeGroup = Field(default_factory=EpisodeGroup)

    @model_validator(mode="before")
    @classmethod
    def _sft_seed(cls, data: Any) -> Any:
        """The SFT stage shuffles with the recipe's seed unless told otherwise."""
        if isinstance(data, dict) and "seed" in data:
            sft = data.get("sft") or {}
            if isinstance(sft, dict) and "seed" not in sft:
                data = {**data, "sft": {**sft, "seed": data["seed"]}}
        return data
