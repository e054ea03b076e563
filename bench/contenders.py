"""The contenders: each scores the whole workload once per `round()` and reports what it took.

A round returns {"seconds", "latencies" (per request), "response_bytes", "positions"
(positions the responses cover)}. Contenders that run in their own process (a worker or a
server) report that process's peak resident memory through `peak_rss_bytes()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from opd.bench.procmem import tree_peak_rss_bytes
from opd.bench.vllm_server import VLLMOpenAIServer
from opd.bench.workload import WorkloadConfig, make_requests
from opd.client.teacher.child_process import start_child, stop_child
from opd.client.teacher.launch import LocalTeacher


class WorkerContender:
    """A contender in its own process (opd.bench.worker, or `module`), driven line by line."""

    def __init__(
        self,
        name: str,
        kind: str,
        cfg: dict[str, Any],
        log: Path,
        env: dict[str, str] | None = None,
        module: str = "opd.bench.worker",
    ) -> None:
        self.name, self.kind = name, kind
        self._log = open(log, "ab")  # noqa: SIM115
        # Dies with the bench, even a SIGKILLed one. SIGINT, not SIGTERM: Python unwinds on
        # KeyboardInterrupt, so a worker running vLLM in-process (bench-train's vllm flavour)
        # stops its engine process at exit instead of leaving it orphaned.
        self.proc = start_child(
            [sys.executable, "-m", module, kind, json.dumps(cfg)],
            death_signal=signal.SIGINT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.setup: dict[str, Any] | None = self._ask(None).get("setup")  # {"ready": true, ...}

    def _ask(self, cmd: str | None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if cmd is not None:
            self.proc.stdin.write(json.dumps({"cmd": cmd}) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench worker {self.kind} died; see {self._log.name}")
        return json.loads(line)

    def round(self) -> dict[str, Any]:
        return self._ask("round")

    def peak_rss_bytes(self) -> int:
        return int(self._ask("peak")["peak_rss_bytes"])

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(RuntimeError, BrokenPipeError, json.JSONDecodeError):
                self._ask("quit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        # Terminates it only if it did not quit; then nothing of its process group stays behind.
        stop_child(self.proc, timeout_s=30)
        self._log.close()


def _concurrent_round(requests: list, concurrency: int, send) -> dict[str, Any]:
    """Send every request with `concurrency` threads; latency of each, total wall time."""

    def one(req: Any) -> tuple[float, int]:
        t0 = time.perf_counter()
        n_bytes = send(req)
        return time.perf_counter() - t0, n_bytes

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(one, requests))
    return {
        "seconds": time.perf_counter() - started,
        "latencies": [lat for lat, _ in done],
        "response_bytes": sum(n for _, n in done),
    }


def _samples(url: str, name: str) -> list[Any]:
    """The samples called `name` on the server's /metrics (Prometheus text)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def _backend_setup(url: str) -> dict[str, Any] | None:
    """The labels of the server's opd_backend_info: its CPU streams and their BLAS."""
    for s in _samples(url, "opd_backend_info"):
        if s.value == 1:
            return {"streams": int(s.labels["streams"]), "cpu_gemm": s.labels["cpu_gemm"]}
    return None


def _payload_bytes_out(url: str) -> float:
    samples = _samples(url, "opd_payload_bytes_out_total")
    return sum(s.value for s in samples if s.labels.get("route") == "/v1/score")


class OPDServer:
    """One `opd serve` process shared by the HTTP contenders of one backend."""

    def __init__(
        self, model: str, backend: str, log: Path, threads: int | None, device: str = "cpu"
    ) -> None:
        env = {"OPD_LOG_LEVEL": "warning", "OPD_DTYPE": "float32", "OPD_DEVICE": device}
        if threads:
            env["OPD_TORCH_THREADS"] = str(threads)
        extra = ["--backend", backend]
        if backend == "vllm":
            env["VLLM_CPU_KVCACHE_SPACE"] = "1"
            extra += ["--enforce-eager"]
        self.teacher = LocalTeacher(model, env=env, log_path=log, extra_args=extra)
        self.teacher.start()
        self.url = self.teacher.url
        self.vocab = int(httpx.get(self.url + "/v1/model").json()["vocab_size"])
        self.setup = _backend_setup(self.url)

    def peak_rss_bytes(self) -> int:
        assert self.teacher.process is not None
        return tree_peak_rss_bytes(self.teacher.process.pid)

    def close(self) -> None:
        self.teacher.stop()


class OPDHTTPContender:
    """The service over real HTTP with the typed client, `concurrency` clients at once."""

    def __init__(
        self, name: str, server: OPDServer, wl: WorkloadConfig, encoding: str, concurrency: int
    ) -> None:
        from opd.client import TeacherClient

        self.name, self.server, self.concurrency = name, server, concurrency
        self.setup = server.setup
        self.requests = make_requests(wl, server.vocab)
        self.client = TeacherClient(
            server.url, encoding=encoding, timeout_s=600, concurrency=concurrency
        )

    def _send(self, req: Any) -> int:
        self.client.score(req)
        return 0

    def round(self) -> dict[str, Any]:
        before = _payload_bytes_out(self.server.url)
        result = _concurrent_round(self.requests, self.concurrency, self._send)
        # bytes on the wire, as the server counted them (the client decodes in place)
        result["response_bytes"] = _payload_bytes_out(self.server.url) - before
        return result

    def peak_rss_bytes(self) -> int:
        return self.server.peak_rss_bytes()

    def close(self) -> None:
        self.client.close()


class CompletionsContender:
    """POST /v1/completions with prompt_logprobs = top_k (max_tokens 1, temperature 0): TRL's
    request, to any server that answers it; `concurrency` clients at once, each parsing the
    per-token dicts as a client must before it can use them."""

    def __init__(
        self, name: str, url: str, model: str, wl: WorkloadConfig, concurrency: int, vocab: int
    ) -> None:
        self.name, self.url, self.model, self.wl = name, url, model, wl
        self.concurrency = concurrency
        self.requests = make_requests(wl, vocab)
        self.http = httpx.Client(timeout=600)

    def _send(self, req: Any) -> int:
        body = {
            "model": self.model,
            "prompt": [req.tokens(i).tolist() for i in range(req.n_sequences)],
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": self.wl.top_k,
        }
        r = self.http.post(self.url + "/v1/completions", json=body)
        r.raise_for_status()
        parsed = r.json()
        assert len(parsed["choices"]) == req.n_sequences
        return len(r.content)

    def round(self) -> dict[str, Any]:
        result = _concurrent_round(self.requests, self.concurrency, self._send)
        # prompt_logprobs covers every position after the first
        result["positions"] = self.wl.sequences * (self.wl.seq_len - 1)
        return result


class OPDCompletionsContender(CompletionsContender):
    """opd's drop-in /v1/completions on an `opd serve` process shared with other contenders."""

    def __init__(self, name: str, server: OPDServer, wl: WorkloadConfig, concurrency: int) -> None:
        model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
        super().__init__(name, server.url, model, wl, concurrency, server.vocab)
        self.server = server
        self.setup = server.setup

    def peak_rss_bytes(self) -> int:
        return self.server.peak_rss_bytes()

    def close(self) -> None:
        self.http.close()


class VLLMServerContender(CompletionsContender):
    """vLLM's own OpenAI-compatible server: what most users run today. Its engine is bound to
    all of this machine's cores."""

    def __init__(
        self,
        name: str,
        model: str,
        wl: WorkloadConfig,
        concurrency: int,
        log: Path,
        device: str = "cpu",
    ) -> None:
        self.server = VLLMOpenAIServer(
            model,
            log,
            max_model_len=max(512, wl.seq_len + 1),
            max_logprobs=wl.top_k,
            device=device,
        )
        self.proc = self.server.proc
        from transformers import AutoConfig

        vocab = int(AutoConfig.from_pretrained(model).vocab_size)
        super().__init__(name, self.server.url, model, wl, concurrency, vocab)

    def peak_rss_bytes(self) -> int:
        return tree_peak_rss_bytes(self.proc.pid)

    def close(self) -> None:
        self.http.close()
        self.server.close()
