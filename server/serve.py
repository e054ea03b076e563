"""`opd serve`: uvicorn with graceful draining.

On SIGTERM/SIGINT the server first *drains*: /readyz turns 503 (a load balancer stops sending),
new /v1 requests get 503 + Retry-After, in-flight requests finish; then uvicorn stops. A second
signal skips the wait. The drain is bounded by OPD_DRAIN_TIMEOUT_S. Plain
`uvicorn opd.server.app:create_app --factory` also finishes in-flight requests on SIGTERM but
closes its listener at once instead of answering 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from opd.server.app import create_app
from opd.server.settings import Settings

logger = logging.getLogger("opd.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self._draining_since: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self.app.state
        if self._draining_since is not None:
            super().handle_exit(sig, frame)  # second signal: stop now
            return
        self._draining_since = time.monotonic()
        state.draining = True
        logger.info("draining: waiting for %d in-flight requests", state.in_flight)
        # Signal handlers may run outside the loop's callbacks: hand over thread-safely.
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._finish_drain(state, sig, frame)))

    async def _finish_drain(self, state, sig: int, frame: FrameType | None) -> None:  # type: ignore[no-untyped-def]
        deadline = (self._draining_since or time.monotonic()) + self.drain_timeout_s
        while state.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        clean = state.in_flight == 0
        logger.info("drained (%d requests still in flight); stopping", state.in_flight)
        super().handle_exit(sig, frame)
        if clean:
            # uvicorn re-raises captured signals at exit; a clean drain exits 0 instead.
            self._captured_signals.clear()


def run_server(settings: Settings) -> None:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
    )
    DrainingServer(config, app, settings.drain_timeout_s).run()
    if app.state.load_error:
        raise SystemExit(f"opd serve: the model failed to load: {app.state.load_error}")
