"""The server's side of an `opd bench-load` phase: its /metrics and its memory.

/metrics (Prometheus text) is read with a ten-line parser: the load client should not depend on
the server's own metrics library to read it. Before/after counters give
the server's own count of what it answered (to cross-check the clients' count); gauges sampled
during the phase give the queue's peak, which no before/after scrape can see. Peak RSS comes from
/proc (opd.bench.procmem), reset at the start of each phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import httpx

from opd.bench.procmem import descendants, reset_peak, tree_peak_rss_bytes

T = TypeVar("T")

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample line."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            try:
                value = float(m.group(3))
            except ValueError:
                continue
            out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), value))
    return out


def score_counters(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, float]:
    """The server's own count of /v1/score answers by status, and its scored positions."""
    out: dict[str, float] = {}
    for name, labels, value in samples:
        if name == "opd_requests_total" and labels.get("route") == "/v1/score":
            key = f"status_{labels.get('status')}"
            out[key] = out.get(key, 0.0) + value
        elif name == "opd_scored_tokens_total":
            out["scored_tokens"] = value
    return out


def gauge(samples: list[tuple[str, dict[str, str], float]], name: str) -> float | None:
    values = [v for n, _, v in samples if n == name]
    return sum(values) if values else None


async def scrape(client: httpx.AsyncClient, url: str) -> list[tuple[str, dict[str, str], float]]:
    try:
        response = await client.get(url + "/metrics", timeout=10)
    except httpx.HTTPError:
        return []
    return parse_metrics(response.text) if response.status_code == 200 else []


class GaugeWatch:
    """Scrapes /metrics every `interval_s` during a phase: the peak of the server's queue and
    in-flight gauges, which a before/after scrape cannot see."""

    def __init__(self, client: httpx.AsyncClient, url: str, interval_s: float = 0.5) -> None:
        self.client, self.url, self.interval_s = client, url, interval_s
        self.peaks: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            samples = await scrape(self.client, self.url)
            for name in ("opd_queue_tokens", "opd_in_flight_requests"):
                value = gauge(samples, name)
                if value is not None:
                    self.peaks[name] = max(self.peaks.get(name, 0.0), value)
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return {
            "peak_queue_tokens": self.peaks.get("opd_queue_tokens"),
            "peak_in_flight": self.peaks.get("opd_in_flight_requests"),
        }


def reset_peaks(pid: int | None) -> None:
    """Restart the high-water mark of every process of the server's tree (a phase's peak)."""
    if pid is None:
        return
    with contextlib.suppress(OSError):
        for p in descendants(pid):
            with contextlib.suppress(OSError):
                reset_peak(p)


def peak(pid: int | None) -> int | None:
    """The tree's summed high-water marks; None without a pid or when /proc cannot tell."""
    if pid is None:
        return None
    with contextlib.suppress(OSError):
        return tree_peak_rss_bytes(pid)
    return None


async def settle(client: httpx.AsyncClient, url: str, limit_s: float = 120.0) -> None:
    """Wait until the server's queue is empty, so that work of a request the client gave up on
    (a timeout) does not run into the next phase."""
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        queued = gauge(await scrape(client, url), "opd_queue_tokens")
        if not queued:
            return
        await asyncio.sleep(0.5)


async def watched(
    client: httpx.AsyncClient, url: str, pid: int | None, run: Awaitable[T]
) -> tuple[T, dict[str, Any]]:
    """Run a phase with its server-side view: /v1/score counters before/after, gauge peaks,
    peak RSS of the server's tree."""
    before = score_counters(await scrape(client, url))
    reset_peaks(pid)
    watch = GaugeWatch(client, url)
    watch.start()
    result = await run
    gauges = await watch.stop()
    if gauges["peak_in_flight"] is not None:  # the scrape itself is in flight when it reads
        gauges["peak_in_flight"] = max(0.0, gauges["peak_in_flight"] - 1)
    after = score_counters(await scrape(client, url))
    counted = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}
    return result, {**gauges, "peak_rss_bytes": peak(pid), "server_counted": counted}
