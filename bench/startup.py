"""`python -m opd.bench.startup`: how long `opd serve` takes to become ready, and what it holds.

Why: start-up time and memory decide how a teacher is deployed (readiness probe budgets,
memory requests, whether two vLLM engines fit), and vLLM's defaults on a CPU made both
unbounded (docs/vllm.md). Each configuration given is started as a real `opd serve` on a free
port, timed from the process start to the first 200 of /readyz, asked one score request (so
the engine is known to answer), and its process tree's peak RSS (every process's high-water
mark, summed: an upper bound) and current RSS are read before it is stopped.

    python -m opd.bench.startup --backend vllm                      # both engines
    python -m opd.bench.startup --backend vllm --env OPD_GENERATE=false
    python -m opd.bench.startup --backend hf

Prints a table and writes `bench-results/startup-<time>.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path

import httpx

from opd.bench.procmem import descendants, rss_bytes, tree_peak_rss_bytes
from opd.client.teacher.launch import LocalTeacher

GB = 1e9


def measure(backend: str, env: dict[str, str], log: Path, timeout_s: float) -> dict[str, object]:
    """One start of `opd serve --backend <backend>` with `env`: seconds to ready, RSS."""
    teacher = LocalTeacher(
        None,
        env=env,
        log_path=log,
        ready_timeout_s=timeout_s,
        extra_args=["--backend", backend],
    )
    started = time.monotonic()
    try:
        teacher.start()
        ready_s = time.monotonic() - started
        body = {"sequences": [{"token_ids": list(range(1, 129)), "score_from": 1}]}
        answer = httpx.post(teacher.url + "/v1/score", json=body, timeout=120)
        answer.raise_for_status()
        assert teacher.process is not None
        pids = descendants(teacher.process.pid)
        current = 0
        for pid in pids:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                current += rss_bytes(pid)
        return {
            "backend": backend,
            "env": env,
            "ready_s": round(ready_s, 1),
            "processes": len(pids),
            "rss_gb": round(current / GB, 2),
            "peak_rss_gb": round(tree_peak_rss_bytes(teacher.process.pid) / GB, 2),
            "scored": len(answer.json()["results"][0]["token_logprobs"]),
        }
    finally:
        teacher.stop(timeout_s=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="vllm", choices=["hf", "vllm"])
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    row = measure(args.backend, env, out / f"startup-{stamp}.log", args.timeout_s)
    row["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"{'backend':8} {'env':40} {'ready s':>8} {'procs':>5} {'RSS GB':>7} {'peak GB':>8}")
    print(
        f"{row['backend']:8} {' '.join(args.env) or '-':40} {row['ready_s']:>8} "
        f"{row['processes']:>5} {row['rss_gb']:>7} {row['peak_rss_gb']:>8}"
    )
    path = out / f"startup-{stamp}.json"
    path.write_text(json.dumps(row, indent=2))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
