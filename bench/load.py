"""`opd bench-load`: the teacher service under more load than it can serve.

    opd bench-load                                   # own teacher (embedded SmolLM2), 2x and 10x
    opd bench-load --server-env OPD_MAX_QUEUE_WAIT_S=5 --seconds 120
    opd bench-load --url http://HOST:8000 --server-pid 1234 --factors 2 --factors 10

Why: a server that accepts everything under overload answers everyone late (a median of ~55 s
was seen under 32 clients); the healthy answer to more work than capacity is a fast 429 for the
excess and unchanged latency for the rest, and no request lost. This command measures that.

Phases, on one request mix (opd.bench.load_traffic: 1..8 sequences of 64..1,024 tokens per
request, plain / top-k / candidates, JSON and msgpack bodies, fixed seed):
1. capacity: `capacity_clients` closed-loop senders at saturation for `capacity_seconds` (after
   one discarded request each): the served req/s and scored tokens/s of the mix;
2. one open-loop phase per load factor: Poisson arrivals (seeded) at factor x capacity req/s for
   `seconds`. At most `clients` requests are in flight (0 = no cap); an arrival that finds them
   all busy is not sent and is counted as `not_sent` (a client-side queue would hide its wait
   from the latency). Clients never retry a 429: each is counted, with its latency and
   Retry-After.

Lost = sent and never served correctly: no HTTP answer (timeout, reset), a 5xx, or a 200 of the
wrong shape. A 408 (the server dropped work whose --deadline-s passed while it was queued) is an
answer, counted under statuses, not lost. Peak RSS is the server's process tree (the sum of each
process's high-water mark since the phase began; needs the pid: own teacher, or --server-pid).
Results: a table on stdout, JSON + markdown in out_dir (bench-load-*.json/.md).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any, ClassVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from opd.bench.load_report import markdown_table
from opd.bench.load_traffic import (
    DEADLINE_HEADER,
    Shot,
    closed_loop,
    make_pool,
    open_loop,
    send,
    summarize,
)
from opd.bench.load_watch import settle, watched
from opd.shared.config_cli import CliSpec


class BenchLoadConfig(BaseModel):
    """Every knob of `opd bench-load` (its flags are generated from these fields)."""

    model_config = ConfigDict(extra="forbid")
    cli: ClassVar[CliSpec] = CliSpec(env={"api_key": "OPD_API_KEY"})

    model: str | None = Field(
        default=None, description="model of the bench's own teacher; default: embedded SmolLM2"
    )
    url: str | None = Field(default=None, description="load this running server instead")
    server_pid: int | None = Field(
        default=None, ge=1, description="with --url: the server's pid, for its peak RSS"
    )
    server_env: list[str] = Field(
        default_factory=list,
        description="KEY=VALUE for the own teacher (repeatable), e.g. OPD_MAX_QUEUE_WAIT_S=5",
    )
    server_args: list[str] = Field(
        default_factory=list,
        description="extra `opd serve` argument for the own teacher (repeatable: "
        "--server-arg=--max-wait-ms --server-arg=5)",
        json_schema_extra={"cli_name": "server_arg"},
    )
    api_key: SecretStr | None = Field(default=None, description="the server's API key")
    deadline_s: float | None = Field(
        default=None,
        gt=0,
        description=f"send {DEADLINE_HEADER}: this many seconds with every request (the "
        "server answers 408 when its work cannot start in time)",
    )
    clients: int = Field(
        default=64,
        ge=0,
        description="most requests in flight in a load phase (0 = no cap); arrivals beyond "
        "it are not sent",
    )
    seconds: float = Field(default=60.0, gt=0, description="length of each load phase")
    factors: tuple[float, ...] = Field(
        default=(2.0, 10.0),
        min_length=1,
        description="offered load as multiples of the measured capacity (repeatable)",
    )
    capacity_clients: int = Field(
        default=8, ge=1, description="closed-loop senders of the capacity phase"
    )
    capacity_seconds: float = Field(default=20.0, gt=0, description="length of the capacity phase")
    capacity_rps: float | None = Field(
        default=None, gt=0, description="skip the capacity phase and take this req/s"
    )
    min_tokens: int = Field(default=64, ge=2, description="shortest sequence (tokens)")
    max_tokens: int = Field(
        default=1024, ge=2, description="longest sequence (tokens; capped by the server)"
    )
    max_sequences: int = Field(default=8, ge=1, description="most sequences per request")
    top_k: int = Field(default=16, ge=0, description="top_k of the top-k requests (a quarter)")
    candidates: int = Field(
        default=16, ge=0, description="candidate ids of the candidate requests (a quarter)"
    )
    msgpack_share: float = Field(default=0.5, ge=0, le=1, description="share of msgpack bodies")
    pool_size: int = Field(default=64, ge=1, description="distinct pre-encoded requests")
    timeout_s: float = Field(default=300.0, gt=0, description="client timeout of one request")
    seed: int = Field(default=0, description="seed of the requests and arrival times")
    out_dir: str = Field(default="bench-results", description="where JSON + markdown results go")

    @model_validator(mode="after")
    def _consistent(self) -> BenchLoadConfig:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} > max_tokens={self.max_tokens}")
        if any(f <= 0 for f in self.factors):
            raise ValueError("factors must be > 0")
        bad = [e for e in self.server_env if "=" not in e or not e.split("=", 1)[0]]
        if bad:
            raise ValueError(f"server_env entries must be KEY=VALUE, got {bad}")
        if self.url and (self.model or self.server_env or self.server_args):
            raise ValueError("--url loads a running server: --model/--server-* do not apply")
        return self


def _client_headers(cfg: BenchLoadConfig) -> dict[str, str]:
    """Headers of every request: the API key (given, or the one handed to the own teacher in
    --server-env) and the deadline, if any."""
    headers = {}
    key = cfg.api_key.get_secret_value() if cfg.api_key else None
    for entry in cfg.server_env:
        name, _, value = entry.partition("=")
        if name == "OPD_API_KEY" and not key:
            key = value
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if cfg.deadline_s is not None:
        headers[DEADLINE_HEADER] = f"{cfg.deadline_s:g}"
    return headers


def _mix(pool: list[Shot]) -> dict[str, Any]:
    return {
        "requests_in_pool": len(pool),
        "mean_sequences": statistics.mean(len(s.n_scored) for s in pool),
        "mean_scored_per_request": statistics.mean(s.scored for s in pool),
        "msgpack_share": sum(s.encoding == "msgpack" for s in pool) / len(pool),
        "top_k_share": sum(s.top_k > 0 for s in pool) / len(pool),
        "candidates_share": sum(s.candidates > 0 for s in pool) / len(pool),
    }


async def _capacity_phase(
    client: httpx.AsyncClient,
    url: str,
    pid: int | None,
    pool: list[Shot],
    cfg: BenchLoadConfig,
    warnings: list[str],
    log: Any,
) -> dict[str, Any]:
    """Closed-loop saturation (or --capacity-rps as given) -> capacity_rps of the mix."""
    mean_scored = _mix(pool)["mean_scored_per_request"]
    if cfg.capacity_rps is not None:
        rate = cfg.capacity_rps
        return {
            "given": True,
            "capacity_rps": rate,
            "capacity_scored_tokens_per_s": rate * mean_scored,
        }
    log(f"capacity: {cfg.capacity_clients} closed-loop clients, {cfg.capacity_seconds:g}s")
    warm = [
        send(client, url, pool[i % len(pool)], time.perf_counter(), cfg.timeout_s)
        for i in range(cfg.capacity_clients)
    ]
    await asyncio.gather(*warm)
    loop = closed_loop(
        client, url, pool, cfg.capacity_clients, cfg.capacity_seconds, cfg.seed, cfg.timeout_s
    )
    (outcomes, wall), server = await watched(client, url, pid, loop)
    capacity = {"clients": cfg.capacity_clients, **summarize(outcomes, wall), **server}
    if not capacity["ok"]:
        raise RuntimeError(f"no request was served in the capacity phase: {capacity}")
    # In requests of the mix's mean size: served tokens/s over the pool's mean scored
    # positions. A count of served requests would swing with which sizes happened to finish.
    tokens_rate = capacity["scored_tokens_per_s"]
    capacity["capacity_rps"] = tokens_rate / mean_scored
    capacity["capacity_scored_tokens_per_s"] = tokens_rate
    if capacity["ok"] < 2 * cfg.capacity_clients:
        warnings.append(
            f"capacity from {capacity['ok']} served requests only: a longer "
            "--capacity-seconds (or a lighter mix) gives a steadier rate"
        )
    log(f"capacity: {capacity['capacity_rps']:.3g} req/s, {tokens_rate:.0f} scored tokens/s")
    return capacity


async def _load_phase(
    client: httpx.AsyncClient,
    url: str,
    pid: int | None,
    pool: list[Shot],
    cfg: BenchLoadConfig,
    index: int,
    capacity: dict[str, Any],
    warnings: list[str],
    log: Any,
) -> dict[str, Any]:
    """One open-loop phase at factor x capacity; its row of the report."""
    factor = cfg.factors[index]
    rate = factor * capacity["capacity_rps"]
    log(f"load {factor:g}x: {rate:.3g} req/s offered for {cfg.seconds:g}s")
    loop = open_loop(
        client, url, pool, rate, cfg.seconds, cfg.clients, cfg.seed + 1 + index, cfg.timeout_s
    )
    run, server = await watched(client, url, pid, loop)
    phase = {
        "factor": factor,
        "offered_rps": rate,
        "offered_scored_tokens_per_s": factor * capacity["capacity_scored_tokens_per_s"],
        "seconds": cfg.seconds,
        "arrivals": run.arrivals,
        "not_sent": run.not_sent,
        "max_client_in_flight": run.max_in_flight,
        "max_sender_lag_ms": run.max_lag_s * 1000,
        **summarize(run.outcomes, run.wall_s),
        **server,
    }
    log(
        f"load {factor:g}x: {phase['ok']} ok, {phase['refused_429']} 429, "
        f"{phase['lost']} lost, {phase['not_sent']} not sent"
    )
    if run.arrivals < 20:
        warnings.append(
            f"{factor:g}x: {run.arrivals} arrivals only; a longer --seconds gives steadier "
            "percentiles"
        )
    if run.max_lag_s > 0.25:
        warnings.append(
            f"{factor:g}x: the sender fell {run.max_lag_s:.2f}s behind its schedule; the "
            "client, not only the server, set the pace"
        )
    return phase


async def _measure(
    cfg: BenchLoadConfig, url: str, pid: int | None, info: dict[str, Any], log: Any
) -> dict[str, Any]:
    lim = info["limits"]
    max_tokens = min(cfg.max_tokens, int(lim["max_tokens_per_sequence"]))
    pool = make_pool(
        cfg.pool_size,
        vocab=int(info["vocab_size"]),
        min_tokens=min(cfg.min_tokens, max_tokens),
        max_tokens=max_tokens,
        max_sequences=max(
            1,
            min(
                cfg.max_sequences, int(lim["max_sequences"]), lim["max_total_tokens"] // max_tokens
            ),
        ),
        top_k=min(cfg.top_k, int(lim["max_top_k"])),
        candidates=min(cfg.candidates, int(lim["max_candidates"])),
        msgpack_share=cfg.msgpack_share,
        seed=cfg.seed,
    )
    width = max(cfg.clients, cfg.capacity_clients) if cfg.clients else None
    pool_limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    headers = _client_headers(cfg)
    async with httpx.AsyncClient(
        timeout=cfg.timeout_s, limits=pool_limits, headers=headers
    ) as client:
        warnings: list[str] = []
        capacity = await _capacity_phase(client, url, pid, pool, cfg, warnings, log)
        phases = []
        for i in range(len(cfg.factors)):
            await settle(client, url)
            phases.append(
                await _load_phase(client, url, pid, pool, cfg, i, capacity, warnings, log)
            )
    return {"mix": _mix(pool), "capacity": capacity, "phases": phases, "warnings": warnings}


def run_bench_load(cfg: BenchLoadConfig, log: Any = print) -> dict[str, Any]:
    """Start (or reach) the server, run the phases, write bench-load-STAMP.json/.md."""
    from opd.bench.runner import _machine, _versions
    from opd.client.teacher.launch import LocalTeacher

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    teacher = None
    try:
        if cfg.url:
            url, pid = cfg.url.rstrip("/"), cfg.server_pid
        else:
            logs = out_dir / f"logs-load-{stamp}"
            logs.mkdir()
            env = {"OPD_LOG_LEVEL": "warning"}
            env.update(e.split("=", 1) for e in cfg.server_env)
            teacher = LocalTeacher(
                cfg.model,
                env=env,
                log_path=logs / "opd-serve.log",
                extra_args=list(cfg.server_args),
            )
            log(f"starting opd serve ({cfg.model or 'embedded SmolLM2'}); log in {logs}")
            url = teacher.start()
            assert teacher.process is not None
            pid = teacher.process.pid
        response = httpx.get(url + "/v1/model", headers=_client_headers(cfg), timeout=30)
        response.raise_for_status()
        info = response.json()
        measured = asyncio.run(_measure(cfg, url, pid, info, log))
    finally:
        if teacher is not None:
            teacher.stop()
    report = {
        "machine": _machine(),
        "versions": _versions(),
        "model": info["name"],
        "backend": info.get("backend"),
        "server": {"url": url, "own": cfg.url is None, "pid": pid},
        "config": cfg.model_dump(mode="json", exclude={"api_key"}),
        **measured,
    }
    path = out_dir / f"bench-load-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    (out_dir / f"bench-load-{stamp}.md").write_text(markdown_table(report))
    report["path"] = str(path)
    return report
