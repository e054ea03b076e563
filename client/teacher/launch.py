"""Start a teacher service as a separate uvicorn process on a free loopback port.

Used by `opd quickstart` and by the tests: the teacher always runs in its own process, as in
production, and is talked to over real HTTP. The process is started with
opd.client.teacher.child_process, so it dies with the process that started it, even if that one
is SIGKILLed (Linux; see that module for the rules).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from opd.client.teacher.child_process import kill_group, start_child, stop_child


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalTeacher:
    """`with LocalTeacher(model=...) as url:` runs `opd serve` until the block ends."""

    def __init__(
        self,
        model: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        log_path: Path | None = None,
        ready_timeout_s: float = 300.0,
        extra_args: list[str] | None = None,
        opd_command: list[str] | None = None,
    ) -> None:
        """opd_command: how to run `opd` (default: this interpreter's; the wheel test runs
        the console script of a separately installed venv)."""
        self.model = model
        self.opd_command = opd_command or [sys.executable, "-m", "opd.client.cli"]
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(env or {})
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None
        self._log = None

    def start(self) -> str:
        cmd = [*self.opd_command, "serve", "--port", str(self.port)]
        if self.model:
            cmd += ["--model", self.model]
        cmd += self.extra_args
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **self.env}
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = start_child(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_ready()
        return self.url

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                kill_group(self.process)  # what a crashed server may have left running
                raise RuntimeError(
                    f"teacher exited with {self.process.returncode} before it was ready"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"teacher not ready after {self.ready_timeout_s}s")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the server drains), SIGKILL after `timeout_s`, then remove anything of its
        process group still alive (vLLM engine processes of a server that was SIGKILLed)."""
        if self.process is None:
            return None
        stop_child(self.process, timeout_s=timeout_s)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()  # type: ignore[union-attr]
        return self.process.returncode

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
