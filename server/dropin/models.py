"""GET /v1/models in vLLM's shape: the served model name a client must send back.

TRL's `VLLMClient` and async distillation worker take `data[0].id` from it and put it in every
request's `model`; prime-rl checks that its configured name is listed. The name is
`OPD_SERVED_MODEL_NAME` (`--served-model-name`), default the model's own name.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# vLLM's fixed owner string is "vllm"; opd names itself so a client can tell them apart.
OWNED_BY = "opd"


class ModelPermission(BaseModel):
    """vLLM lists one permission object per model; clients ignore it, but its shape is kept."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: f"modelperm-{uuid.uuid4().hex[:16]}")
    object: str = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    """One entry of GET /v1/models, field for field as vLLM serialises it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="the served model name: what requests put in `model`")
    object: str = "model"
    created: int = Field(description="unix time the server started")
    owned_by: str = OWNED_BY
    root: str = Field(description="the model the name serves (its path or hub id)")
    parent: str | None = None
    max_model_len: int
    permission: list[dict[str, Any]] = Field(default_factory=list)


class ModelList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    object: str = "list"
    data: list[ModelCard]


def model_card(served_name: str, root: str, max_model_len: int, created: int) -> ModelCard:
    return ModelCard(
        id=served_name,
        created=created,
        root=root,
        max_model_len=max_model_len,
        permission=[ModelPermission(created=created).model_dump()],
    )


def started_at() -> int:
    return int(time.time())
