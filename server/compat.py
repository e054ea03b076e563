"""Routes in the shapes other trainers already send to vLLM and SGLang teacher servers.

TRL, prime-rl and slime talk to their teacher through vLLM's OpenAI-compatible server (or
SGLang's); these routes answer in those shapes on the same server, port, auth and limits, so a
trainer can point at opd unchanged. They only translate shapes: every number comes from the one
scoring path (opd.server.scoring through the service). This module holds the first of them:
- `GET /health` and `GET /health/`: 200 once the process is alive, as vLLM answers (TRL's
  `VLLMClient` and prime-rl poll it before anything else);
- `GET /v1/models`: vLLM's model list, with the served model name (`OPD_SERVED_MODEL_NAME`,
  default the model's own name) as the id a client must send back.
The scoring routes of these shapes (`/v1/completions` with `prompt_logprobs`, prime-rl's and
SGLang's generate routes) build on them; docs/protocol.md says which exist.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field

# vLLM's fixed owner string is "vllm"; opd names itself so a client can tell them apart.
OWNED_BY = "opd"


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


def compat_router(
    models: Callable[[], list[ModelCard]], require_api_key: Callable[..., Any]
) -> APIRouter:
    """The drop-in routes; `models()` raises the service's not-ready error while loading."""
    router = APIRouter(tags=["drop-in"])

    @router.get("/health")
    @router.get("/health/", include_in_schema=False)
    async def health() -> Response:
        """Alive (vLLM's /health: 200, empty body)."""
        return Response(status_code=200)

    @router.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_api_key)])
    async def list_models() -> ModelList:
        """The served model, in vLLM's list shape."""
        return ModelList(data=models())

    return router


def model_card(served_name: str, root: str, max_model_len: int, created: int) -> ModelCard:
    return ModelCard(id=served_name, created=created, root=root, max_model_len=max_model_len)


def started_at() -> int:
    return int(time.time())
