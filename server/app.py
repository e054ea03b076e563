"""FastAPI app factory for the teacher service.

    uvicorn opd.server.app:create_app --factory      # settings from OPD_* variables
    opd serve --model PATH                            # same app, with graceful draining

Nothing happens at import time: `create_app(settings)` composes the app from the settings, the
lifespan (loads the model off the event loop, warms it up, drains and releases it), the error
handlers, the per-request context (ids, deadlines, draining, request metrics), opd's own routes
(opd.server.routes) and the drop-in ones (opd.server.dropin.routes). Errors of every kind leave
through the handlers registered in `_install_error_handlers` as one JSON shape
(opd.shared.errors.ErrorBody), or OpenAI's on the drop-in routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from opd.server.admission import (
    DEADLINE_HEADER,
    DeadlineExceeded,
    RateLimited,
    parse_deadline,
    request_deadline,
)
from opd.server.backends import create_backend
from opd.server.backends.base import Backend
from opd.server.batcher import BatcherClosed, QueueFull
from opd.server.dropin.errors import dropin_status, is_dropin_path, openai_error
from opd.server.dropin.models import started_at
from opd.server.dropin.routes import DropInContext, dropin_router
from opd.server.metrics import Metrics
from opd.server.openapi_doc import install_openapi
from opd.server.routes import (
    Draining,
    Serving,
    Unauthorized,
    api_key_guard,
    health_router,
    native_router,
    route_label,
)
from opd.server.service import ScoringService
from opd.server.settings import Settings
from opd.shared.errors import ContractError, ErrorBody, ErrorDetail
from opd.shared.version import PROTOCOL_VERSION

logger = logging.getLogger("opd.server")


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


def _install_request_context(app: FastAPI, metrics: Metrics) -> None:
    """Per request: an id, the deadline header, in-flight accounting, 503 while draining, and
    the request counted by route and status (errors included), for every route."""

    @app.middleware("http")
    async def request_context(request: Request, call_next):  # type: ignore[no-untyped-def]
        request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        started = time.perf_counter()
        app.state.in_flight += 1
        metrics.in_flight.inc()
        try:
            path = request.url.path
            if app.state.draining and (path.startswith("/v1/") or is_dropin_path(path)):
                response = await _draining_response(request)
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
        metrics.request_done(
            route_label(request), response.status_code, time.perf_counter() - started
        )
        response.headers["X-Request-ID"] = request.state.request_id
        return response


async def _draining_response(request: Request) -> Response:
    detail = ErrorDetail(
        type="unavailable", message="the server is draining", request_id=_request_id(request)
    )
    return _error(request, 503, detail, {"Retry-After": "1", "Connection": "close"})


def _lifespan(service: ScoringService) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Load the model in the background (so /healthz answers and /readyz says 503 meanwhile);
    on shutdown, drain: new work gets 503 and the service stops."""

    async def load(app: FastAPI) -> None:
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
        loading = asyncio.get_running_loop().create_task(load(app), name="opd-load")
        try:
            yield
        finally:
            app.state.draining = True
            if not loading.done():
                loading.cancel()
                with contextlib.suppress(BaseException):
                    await loading
            await service.stop()

    return lifespan


def create_app(
    settings: Settings | None = None,
    backend_factory: Callable[[Settings], Backend] | None = None,
) -> FastAPI:
    """Build the app; with no arguments, settings come from OPD_* environment variables."""
    settings = settings or Settings()
    metrics = Metrics()
    service = ScoringService(settings, backend_factory or create_backend, metrics)
    app = FastAPI(
        title="opd teacher scoring service",
        version=PROTOCOL_VERSION,
        description="Scores token sequences with a teacher LLM for on-policy distillation. "
        "See docs/protocol.md.",
        lifespan=_lifespan(service),
    )
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics
    app.state.draining = False
    app.state.in_flight = 0
    app.state.load_error = None
    _install_error_handlers(app)
    _install_request_context(app, metrics)

    serving = Serving(service, metrics, app.state)
    require_api_key = api_key_guard(settings)
    app.include_router(health_router(serving))
    app.include_router(
        dropin_router(DropInContext(serving, settings, started_at()), require_api_key)
    )
    app.include_router(native_router(serving, require_api_key))
    install_openapi(app)
    return app
