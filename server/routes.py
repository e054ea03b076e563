"""opd's own routes: health, readiness, metrics, GET /v1/model, GET /v1/tokenizer, POST
/v1/score, POST /v1/generate.

Thin glue over opd.server.service.ScoringService. `Serving` is what every route needs from the
app, these and the drop-in ones (opd.server.dropin.routes) alike: readiness, a body read within
the size limit, and the payload counted in one place (opd.server.metrics). `api_key_guard`
builds the auth dependency (bearer keys, per-key rate limits) both routers put on their routes.
Errors leave as exceptions; opd.server.app's handlers turn them into the wire's error shape.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from opd.server.admission import KeyRateLimiter, key_id
from opd.server.metrics import Metrics
from opd.server.openapi_doc import request_body
from opd.server.request_body import read_body
from opd.server.service import ScoringService
from opd.server.settings import Settings
from opd.shared.errors import ErrorBody
from opd.shared.schemas import (
    GenerateRequest,
    GenerateResponse,
    ModelInfo,
    ScoreRequest,
    ScoreResponseJSON,
    TokenizerFiles,
)
from opd.shared.version import JSON_MEDIA_TYPE, MSGPACK_MEDIA_TYPE


class Draining(Exception):
    """The server is shutting down or still loading: new work is refused with 503."""


class Unauthorized(Exception):
    """No API key, or a wrong one, on a route that needs one (401)."""


def route_label(request: Request) -> str:
    """The matched route's path template: the `route` label of every per-route metric."""
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


@dataclass
class Serving:
    """What every scoring route shares: the service, readiness, bodies and their bytes."""

    service: ScoringService
    metrics: Metrics
    state: Any  # the app's state: draining, load_error

    def ensure_ready(self) -> None:
        """503 while the model loads (the app's handler says loading or draining)."""
        if not self.service.ready:
            raise Draining()

    async def receive(self, request: Request) -> bytes:
        """The body of a request to a ready server, within max_body_bytes, counted."""
        self.ensure_ready()
        body = await read_body(request, self.service.limits.max_body_bytes)
        self.metrics.payload_in(route_label(request), len(body))
        return body

    def reply(self, request: Request, payload: bytes, media_type: str) -> Response:
        """The answer's bytes, counted."""
        self.metrics.payload_out(route_label(request), len(payload))
        return Response(payload, media_type=media_type)


def api_key_guard(settings: Settings) -> Callable[[Request], Awaitable[None]]:
    """The dependency of every route that needs a key: with keys set, a bearer token that is
    one of them (compared in constant time); then the key's rate limit, if one is set."""
    secrets = [k.get_secret_value() for k in [settings.api_key, *settings.api_keys] if k]
    api_keys = {k.encode(): key_id(k) for k in secrets}  # value -> the name logs may show
    limiter = (
        KeyRateLimiter(settings.rate_limit_rps, settings.rate_limit_burst)
        if settings.rate_limit_rps
        else None
    )

    async def require_api_key(request: Request) -> None:
        if not api_keys:
            if limiter is not None:
                limiter.take("anonymous")
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        sent = token.strip().encode()
        # Compare against every key (constant time each), so timing does not say which matched.
        matched = [name for key, name in api_keys.items() if hmac.compare_digest(sent, key)]
        if scheme.lower() != "bearer" or not matched:
            raise Unauthorized()
        request.state.key_name = matched[0]
        if limiter is not None:
            limiter.take(matched[0])

    return require_api_key


def health_router(serving: Serving) -> APIRouter:
    """Liveness, readiness and metrics: open, so probes and scrapers need no key."""
    router = APIRouter(tags=["health"])
    state = serving.state

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive (liveness)."""
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz() -> Response:
        """The model is loaded and warmed up and the server is not draining (readiness)."""
        if serving.service.ready and not state.draining:
            return JSONResponse({"status": "ready"})
        status = "draining" if state.draining else "loading"
        if state.load_error:
            status = "failed"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)

    @router.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(serving.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def native_router(serving: Serving, require_api_key: Callable[..., Any]) -> APIRouter:
    """/v1/model, /v1/score and /v1/generate, behind the API key."""
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["v1"])
    service = serving.service

    @v1.get("/model", response_model=ModelInfo)
    async def model() -> ModelInfo:
        """What the teacher is: name, revision, vocabulary, limits, tokenizer fingerprint."""
        serving.ensure_ready()
        return service.model_info()

    @v1.get(
        "/tokenizer",
        response_model=TokenizerFiles,
        responses={s: {"model": ErrorBody} for s in (401, 501, 503)},
    )
    async def tokenizer(request: Request) -> Response:
        """The teacher's tokenizer as text files (tokenizer.json, its config, chat template),
        so a student of another family renders and tokenizes text as the teacher does."""
        serving.ensure_ready()
        return serving.reply(request, await service.tokenizer_files(), JSON_MEDIA_TYPE)

    @v1.post(
        "/score",
        response_model=ScoreResponseJSON,
        openapi_extra=request_body(ScoreRequest, msgpack=True),
        responses={
            200: {"content": {MSGPACK_MEDIA_TYPE: {}}},
            400: {"model": ErrorBody},
            401: {"model": ErrorBody},
            408: {"model": ErrorBody},
            413: {"model": ErrorBody},
            415: {"model": ErrorBody},
            422: {"model": ErrorBody},
            429: {"model": ErrorBody},
            500: {"model": ErrorBody},
            503: {"model": ErrorBody},
        },
    )
    async def score(request: Request) -> Response:
        """Teacher log-probs of the actual tokens, at candidate ids, top-k and entropy.

        JSON or msgpack by Content-Type; the answer's encoding follows Accept (default: the
        request's). See docs/protocol.md for the binary layout.
        """
        body = await serving.receive(request)
        encoded = await service.score(
            body, request.headers.get("content-type"), request.headers.get("accept")
        )
        if isinstance(encoded.body, dict):
            payload = orjson.dumps(encoded.body, option=orjson.OPT_SERIALIZE_NUMPY)
        else:
            payload = encoded.body
        return serving.reply(request, payload, encoded.media_type)

    @v1.post(
        "/generate",
        response_model=GenerateResponse,
        openapi_extra=request_body(GenerateRequest),
        responses={
            s: {"model": ErrorBody} for s in (400, 401, 408, 413, 415, 422, 429, 500, 501, 503)
        },
    )
    async def generate(request: Request) -> Response:
        """Teacher completions for prompts (text rendered with the chat template, or token ids):
        temperature, top-p, max_tokens, n, seed. Same auth, limits and errors as /v1/score."""
        body = await serving.receive(request)
        answer = await service.generate(body, request.headers.get("content-type"))
        return serving.reply(request, answer.model_dump_json().encode(), JSON_MEDIA_TYPE)

    return v1
