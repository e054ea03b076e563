"""FastAPI app factory for the teacher service.

    uvicorn opd.server.app:create_app --factory      # settings from OPD_* variables
    opd serve --model PATH                            # same app, with graceful draining

Nothing happens at import time: `create_app(settings)` builds the app, its lifespan loads the
model (off the event loop), warms it up and releases it. Routes are thin glue over
opd.server.service.ScoringService; errors of every kind leave through the handlers registered
in `_install_error_handlers` as one JSON shape (opd.shared.errors.ErrorBody).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from opd.server.admission import (
    DEADLINE_HEADER,
    DeadlineExceeded,
    KeyRateLimiter,
    RateLimited,
    key_id,
    parse_deadline,
    request_deadline,
)
from opd.server.backends import create_backend
from opd.server.backends.base import Backend
from opd.server.batcher import BatcherClosed, QueueFull
from opd.server.dropin.errors import dropin_status, is_dropin_path, openai_error
from opd.server.dropin.models import ModelCard, model_card, started_at
from opd.server.dropin.routes import DropInContext, dropin_router
from opd.server.metrics import Metrics
from opd.server.openapi_doc import install_openapi, request_body
from opd.server.request_body import read_body
from opd.server.service import ScoringService
from opd.server.settings import Settings
from opd.shared.errors import ContractError, ErrorBody, ErrorDetail
from opd.shared.schemas import (
    GenerateRequest,
    GenerateResponse,
    ModelInfo,
    ScoreRequest,
    ScoreResponseJSON,
)
from opd.shared.version import JSON_MEDIA_TYPE, MSGPACK_MEDIA_TYPE, PROTOCOL_VERSION

logger = logging.getLogger("opd.server")


class Draining(Exception):
    """The server is shutting down: new work is refused with 503 while in-flight work ends."""


class Unauthorized(Exception):
    pass


def _error(
    request: Request, status: int, detail: ErrorDetail, headers: dict[str, str] | None = None
) -> Response:
    """opd's error shape, or OpenAI's on the drop-in routes (what their clients parse)."""
    if is_dropin_path(request.url.path):
        return JSONResponse(openai_error(status, detail), dropin_status(status), headers)
    return JSONResponse(
        ErrorBody(error=detail).model_dump(exclude_none=True), status_code=status, headers=headers
    )


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or "-"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ContractError)
    async def contract_error(request: Request, exc: ContractError) -> Response:
        return _error(request, exc.status, exc.detail(_request_id(request)))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> Response:
        detail = ErrorDetail(
            type="queue_full",
            message=str(exc),
            field=exc.field,
            limit=exc.limit,
            request_id=_request_id(request),
        )
        return _error(request, 429, detail, {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RateLimited)
    async def rate_limited(request: Request, exc: RateLimited) -> Response:
        request.app.state.metrics.rate_limited.inc()
        detail = ErrorDetail(
            type="rate_limited",
            message=str(exc),
            field="rate_limit_rps",
            limit=exc.rps,
            request_id=_request_id(request),
        )
        return _error(request, 429, detail, {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(DeadlineExceeded)
    async def deadline_exceeded(request: Request, exc: DeadlineExceeded) -> Response:
        detail = ErrorDetail(
            type="deadline_exceeded",
            message=str(exc),
            field=DEADLINE_HEADER,
            limit=round(exc.deadline_s, 3),
            request_id=_request_id(request),
        )
        return _error(request, 408, detail)

    @app.exception_handler(Draining)
    @app.exception_handler(BatcherClosed)
    async def draining(request: Request, exc: Exception) -> Response:
        draining_now = request.app.state.draining
        detail = ErrorDetail(
            type="unavailable",
            message="the server is draining" if draining_now else "the model is loading",
            request_id=_request_id(request),
        )
        headers = {"Retry-After": "1"}
        if draining_now:
            headers["Connection"] = "close"
        return _error(request, 503, detail, headers)

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, exc: Unauthorized) -> Response:
        detail = ErrorDetail(
            type="unauthorized",
            message="missing or wrong API key: send Authorization: Bearer <OPD_API_KEY>",
            field="Authorization",
            request_id=_request_id(request),
        )
        return _error(request, 401, detail, {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = ErrorDetail(
            type="http_error", message=str(exc.detail), request_id=_request_id(request)
        )
        return _error(request, exc.status_code, detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in err.get("loc", ()))
        detail = ErrorDetail(
            type="validation_error",
            message=f"{field}: {err.get('msg')}",
            field=field or None,
            request_id=_request_id(request),
        )
        return _error(request, 422, detail)

    app.add_exception_handler(Exception, internal_error_response)


async def internal_error_response(request: Request, exc: Exception) -> Response:
    """500 with the request id in the body and, with the traceback, in the log."""
    rid = _request_id(request)
    logger.error("request %s failed: %r", rid, exc, exc_info=exc)
    detail = ErrorDetail(
        type="internal_error",
        message=f"internal error ({type(exc).__name__}); see the server log for request_id {rid}",
        request_id=rid,
    )
    return _error(request, 500, detail)


def _route_label(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


def create_app(
    settings: Settings | None = None,
    backend_factory: Callable[[Settings], Backend] | None = None,
) -> FastAPI:
    """Build the app; with no arguments, settings come from OPD_* environment variables."""
    settings = settings or Settings()
    metrics = Metrics()
    service = ScoringService(settings, backend_factory or create_backend, metrics)
    secrets = [k.get_secret_value() for k in [settings.api_key, *settings.api_keys] if k]
    api_keys = {k.encode(): key_id(k) for k in secrets}  # value -> the name logs may show
    limiter = (
        KeyRateLimiter(settings.rate_limit_rps, settings.rate_limit_burst)
        if settings.rate_limit_rps
        else None
    )

    async def load() -> None:
        try:
            await service.start()
        except Exception as exc:
            # A teacher that cannot load must not sit there unready forever: log and stop.
            logger.error("model failed to load: %r", exc, exc_info=exc)
            app.state.load_error = repr(exc)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        logger.info("ready: %s", service.model_info().model_dump_json())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background so /healthz answers (and /readyz says 503) during the load.
        loading = asyncio.get_running_loop().create_task(load(), name="opd-load")
        try:
            yield
        finally:
            app.state.draining = True
            if not loading.done():
                loading.cancel()
                with contextlib.suppress(BaseException):
                    await loading
            await service.stop()

    app = FastAPI(
        title="opd teacher scoring service",
        version=PROTOCOL_VERSION,
        description="Scores token sequences with a teacher LLM for on-policy distillation. "
        "See docs/protocol.md.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics
    app.state.draining = False
    app.state.in_flight = 0
    app.state.load_error = None
    _install_error_handlers(app)

    @app.middleware("http")
    async def request_context(request: Request, call_next):  # type: ignore[no-untyped-def]
        request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        started = time.perf_counter()
        app.state.in_flight += 1
        metrics.in_flight.inc()
        try:
            path = request.url.path
            if app.state.draining and (path.startswith("/v1/") or is_dropin_path(path)):
                response = await draining_response(request)
            else:
                # The batcher reads the deadline from this ContextVar (opd.server.admission).
                request_deadline.set(parse_deadline(request.headers.get(DEADLINE_HEADER)))
                response = await call_next(request)
        except ContractError as exc:  # a malformed X-OPD-Deadline
            response = _error(request, exc.status, exc.detail(_request_id(request)))
        except Exception as exc:  # anything the specific handlers did not turn into a response
            response = await internal_error_response(request, exc)
        finally:
            app.state.in_flight -= 1
            metrics.in_flight.dec()
        route = _route_label(request)
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - started)
        response.headers["X-Request-ID"] = request.state.request_id
        return response

    async def draining_response(request: Request) -> Response:
        detail = ErrorDetail(
            type="unavailable", message="the server is draining", request_id=_request_id(request)
        )
        return _error(request, 503, detail, {"Retry-After": "1", "Connection": "close"})

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

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is alive (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> Response:
        """The model is loaded and warmed up and the server is not draining (readiness)."""
        if service.ready and not app.state.draining:
            return JSONResponse({"status": "ready"})
        status = "draining" if app.state.draining else "loading"
        if app.state.load_error:
            status = "failed"
        return JSONResponse({"status": status, "error": app.state.load_error}, status_code=503)

    @app.get("/metrics", tags=["health"])
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    created = started_at()

    def ensure_ready() -> None:
        if not service.ready:
            raise Draining()

    def served_name() -> str:
        return settings.served_model_name or service.model_info().name

    def served_models() -> list[ModelCard]:
        ensure_ready()
        info = service.model_info()
        root = settings.model or info.name
        return [model_card(served_name(), root, info.max_model_len, created)]

    dropin = DropInContext(service, ensure_ready, served_name, served_models)
    app.include_router(dropin_router(dropin, require_api_key))

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["v1"])

    @v1.get("/model", response_model=ModelInfo)
    async def model() -> ModelInfo:
        """What the teacher is: name, revision, vocabulary, limits, tokenizer fingerprint."""
        if not service.ready:
            raise Draining()
        return service.model_info()

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
        if not service.ready:
            raise Draining()
        body = await read_body(request, service.limits.max_body_bytes)
        metrics.bytes_in.labels("/v1/score").inc(len(body))
        encoded = await service.score(
            body, request.headers.get("content-type"), request.headers.get("accept")
        )
        if isinstance(encoded.body, dict):
            payload = orjson.dumps(encoded.body, option=orjson.OPT_SERIALIZE_NUMPY)
        else:
            payload = encoded.body
        metrics.bytes_out.labels("/v1/score").inc(len(payload))
        return Response(payload, media_type=encoded.media_type)

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
        if not service.ready:
            raise Draining()
        body = await read_body(request, service.limits.max_body_bytes)
        metrics.bytes_in.labels("/v1/generate").inc(len(body))
        answer = await service.generate(body, request.headers.get("content-type"))
        payload = answer.model_dump_json().encode()
        metrics.bytes_out.labels("/v1/generate").inc(len(payload))
        return Response(payload, media_type=JSON_MEDIA_TYPE)

    app.include_router(v1)
    install_openapi(app)
    return app
