"""A real uvicorn server in a thread of the test process, for apps built with custom backends
(fault injection, slow loading). Still real HTTP over loopback."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn

from opd.client.teacher.launch import free_port
from opd.server.backends.hf import HFBackend


@contextlib.contextmanager
def serve_in_thread(app, wait_ready: bool = True) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    path = "/readyz" if wait_ready else "/healthz"
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    else:
        raise TimeoutError("in-thread server did not start")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


class SlowLoadingBackend(HFBackend):
    """An HF backend whose load() waits for `release`: the service's loading state, observed."""

    release = threading.Event()

    def load(self):
        self.release.wait(60)
        return super().load()
