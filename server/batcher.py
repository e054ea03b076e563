"""Dynamic batching: sequences from many concurrent requests share forward passes.

Flow: a request is split into per-sequence items and queued. One asyncio task takes the items
that arrived (oldest first, up to `max_batch_tokens` real tokens), sorts them by length and cuts
them into *packs* whose padded size (sequences x longest) stays under the same budget, so
padding stays small. Each pack runs on a dedicated single worker thread: the event loop never
runs the model and keeps accepting requests meanwhile. A request's future resolves when all its
items are done; the items of one request may land in different packs.

Backpressure, two bounds, both answered at once with QueueFull (HTTP 429 + Retry-After):
- memory: a request that would push the queue over `max_queue_tokens` is refused;
- latency: a request whose expected wait (tokens queued ahead of it / the measured tokens per
  second of recent forward passes) exceeds `max_queue_wait_s`, or exceeds the client's own
  deadline (opd.server.admission), is refused; Retry-After is the time the backlog needs to
  fall back under the bound.
An empty queue always admits one request, so every request within the limits can eventually be
served. Work still queued when its client's deadline passes is dropped uncomputed (408).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from opd.modeling.scoring import ScoredRows
from opd.server.admission import DeadlineExceeded, request_deadline
from opd.server.backends.base import Backend, ScoreItem, items_from_request
from opd.server.metrics import Metrics
from opd.shared.packed import PackedRequest, PackedResult, concat_row_arrays

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue cannot take this request now; retry after `retry_after` seconds."""

    def __init__(
        self,
        queued: float,
        limit: float,
        retry_after: int,
        field: str = "max_queue_tokens",
        unit: str = "tokens",
    ) -> None:
        super().__init__(
            f"queue holds {queued} {unit}; {field}={limit}; retry after {retry_after}s"
        )
        self.queued = queued
        self.limit = limit
        self.retry_after = retry_after
        self.field = field


class BatcherClosed(Exception):
    """The batcher is stopping and takes no new work."""


@dataclass
class _Job:
    """One request in flight: its items and where their results go."""

    request: PackedRequest
    future: asyncio.Future[PackedResult]
    results: list[ScoredRows | None]
    remaining: int
    enqueued_at: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # absolute monotonic; its work must start by then
    started: bool = False  # a forward pass has taken one of its items


@dataclass
class _Entry:
    job: _Job
    index: int
    item: ScoreItem


class Batcher:
    def __init__(
        self,
        backend: Backend,
        metrics: Metrics,
        *,
        model_name: str,
        max_batch_tokens: int,
        max_queue_tokens: int,
        max_wait_ms: float = 2.0,
        max_queue_wait_s: float | None = None,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.model_name = model_name
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_tokens = max_queue_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_wait_s = max_queue_wait_s
        self._pending: deque[_Entry] = deque()
        self._queued_tokens = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-model")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._tokens_per_s = 0.0  # exponential moving average, for Retry-After

    # ---- lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="opd-batcher")

    async def stop(self) -> None:
        """Finish everything queued, then stop the loop and the worker thread."""
        self._closed = True
        while self._pending:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def run_in_worker(self, fn, *args):  # type: ignore[no-untyped-def]
        """Run a blocking call on the model thread (used for warm-up and tests)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def tokens_per_s(self) -> float:
        """Measured throughput (moving average over forward passes; 0 before the first)."""
        return self._tokens_per_s

    def calibrate(self, tokens: int, seconds: float) -> None:
        """Seed the throughput estimate (the service times a full pack at start-up), so the
        wait bound holds from the first burst on."""
        if tokens > 0 and seconds > 0:
            self._tokens_per_s = tokens / seconds

    def expected_wait_s(self, extra_tokens: int = 0) -> float:
        """Seconds the queued work (plus `extra_tokens`) needs at the measured throughput."""
        if not self._tokens_per_s:
            return 0.0
        return (self._queued_tokens + extra_tokens) / self._tokens_per_s

    # ---- submission

    async def submit(self, request: PackedRequest) -> PackedResult:
        if self._closed:
            raise BatcherClosed("the server is shutting down")
        tokens = int(request.seq_lens_n.sum())
        deadline = request_deadline.get()
        self._admit(tokens, deadline)
        loop = asyncio.get_running_loop()
        n = request.n_sequences
        job = _Job(request, loop.create_future(), [None] * n, n, deadline=deadline)
        for i, item in enumerate(items_from_request(request)):
            self._pending.append(_Entry(job, i, item))
        self._queued_tokens += tokens
        self.metrics.queue_tokens.set(self._queued_tokens)
        self.metrics.expected_wait.set(self.expected_wait_s())
        self.metrics.queue_sequences.set(len(self._pending))
        self._wakeup.set()
        return await job.future

    def _admit(self, tokens: int, deadline: float | None) -> None:
        """Raise QueueFull when the request would break a bound (see the module doc)."""
        if not self._pending and self._queued_tokens == 0:
            return  # an idle server takes anything within the request limits
        if self._queued_tokens + tokens > self.max_queue_tokens:
            raise QueueFull(self._queued_tokens, self.max_queue_tokens, self._retry_after(tokens))
        wait = self.expected_wait_s()
        if self.max_queue_wait_s is not None and wait > self.max_queue_wait_s:
            raise QueueFull(
                round(wait, 1),
                self.max_queue_wait_s,
                max(1, math.ceil(wait - self.max_queue_wait_s)),
                field="max_queue_wait_s",
                unit="seconds of expected wait",
            )
        if deadline is not None:
            left = deadline - time.monotonic()
            if wait > left:
                raise QueueFull(
                    round(wait, 1),
                    round(left, 3),
                    max(1, math.ceil(wait - left)),
                    field="X-OPD-Deadline",
                    unit="seconds of expected wait",
                )

    def _retry_after(self, tokens: int) -> int:
        rate = self._tokens_per_s or 1000.0
        return max(1, math.ceil((self._queued_tokens + tokens - self.max_queue_tokens) / rate))

    # ---- the loop

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            if self.max_wait_s:
                await asyncio.sleep(self.max_wait_s)
            self._wakeup.clear()
            while self._pending:
                packs = self._take_packs()
                for pack in packs:
                    await self._run_pack(pack)

    def _take_packs(self) -> list[list[_Entry]]:
        """Oldest items up to the token budget, sorted by length, cut into padded-budget packs."""
        taken: list[_Entry] = []
        budget = self.max_batch_tokens
        total = 0
        while self._pending:
            entry = self._pending[0]
            job = entry.job
            expired = job.deadline is not None and time.monotonic() > job.deadline
            if expired and not job.started and not job.future.done():
                # The client gave up (its X-OPD-Deadline passed): compute nothing for it.
                job.future.set_exception(DeadlineExceeded(job.deadline - job.enqueued_at))
                self.metrics.deadline_dropped.inc()
            if job.future.done():  # cancelled, failed or expired: drop the leftovers
                self._pending.popleft()
                self._queued_tokens -= entry.item.n_tokens
                continue
            if not job.started:
                job.started = True
                self.metrics.queue_wait.observe(time.monotonic() - job.enqueued_at)
            if taken and total + entry.item.n_tokens > budget:
                break
            self._pending.popleft()
            taken.append(entry)
            total += entry.item.n_tokens
        taken.sort(key=lambda e: e.item.n_tokens, reverse=True)
        packs: list[list[_Entry]] = []
        current: list[_Entry] = []
        for entry in taken:  # longest first, so current[0] is the pack's longest
            longest = current[0].item.n_tokens if current else entry.item.n_tokens
            if current and longest * (len(current) + 1) > budget:
                packs.append(current)
                current = []
            current.append(entry)
        if current:
            packs.append(current)
        return packs

    async def _run_pack(self, pack: list[_Entry]) -> None:
        items = [e.item for e in pack]
        real = sum(it.n_tokens for it in items)
        padded = max(it.n_tokens for it in items) * len(items)
        started = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.backend.score_pack, items
            )
        except Exception as exc:
            logger.exception("backend failed on a pack of %d sequences", len(items))
            for e in pack:
                if not e.job.future.done():
                    e.job.future.set_exception(exc)
            results = None
        finally:
            self._queued_tokens -= real
            self.metrics.queue_tokens.set(self._queued_tokens)
            self.metrics.expected_wait.set(self.expected_wait_s())
            self.metrics.queue_sequences.set(len(self._pending))
        elapsed = time.perf_counter() - started
        self.metrics.batch_sequences.observe(len(items))
        self.metrics.batch_tokens.observe(real)
        self.metrics.batch_fill.observe(real / padded)
        self.metrics.forward_seconds.observe(elapsed)
        if elapsed > 0:
            rate = real / elapsed
            self._tokens_per_s = (
                rate if not self._tokens_per_s else 0.8 * self._tokens_per_s + 0.2 * rate
            )
        if results is None:
            return
        now = time.monotonic()
        for e, rows in zip(pack, results, strict=True):
            job = e.job
            if job.future.done():
                continue
            if job.remaining == len(job.results):  # this request's first finished pass
                self.metrics.first_pass.observe(now - job.enqueued_at)
            job.results[e.index] = rows
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(self._assemble(job))

    def _assemble(self, job: _Job) -> PackedResult:
        rows = [r for r in job.results if r is not None]
        req = job.request
        return PackedResult(
            scored_offsets_n1=req.scored_offsets_n1,
            **concat_row_arrays(rows),
            model=self.model_name,
            temperature=req.options.temperature,
            logprob_dtype=req.options.logprob_dtype,
            input_tokens=int(req.seq_lens_n.sum()),
        )
