"""CPU streams: a pack's sequences split across threads that each run the model with fewer cores.

On a CPU, one forward pass over all cores spends part of its time at the thread barriers of
each op: attention, RMSNorm, SiLU and the rest are too small to keep every core busy from start
to finish. Two passes side by side, each on half the cores, keep the cores busy instead: the
same trade OpenVINO makes with its throughput "streams" and TorchServe with several workers per
host. On our 2-core VM, two single-thread streams scored 7-8% more SmolLM2 tokens/s than one
2-thread pass (docs/benchmarks.md). The model's weights are shared (threads, not processes), so
memory grows only by one pass's activations per stream.

Thread counts: torch's intra-op thread count is per thread (OpenMP and MKL keep it
thread-locally), but torch.set_num_threads also stores a process-wide default that threads read
on their first op. Each stream thread sets its own count once, at start-up, and the process-wide
default is then put back, so other threads (the batcher, generation) keep all cores.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def balanced_cuts(costs: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Cut costs, in order, into at most `parts` contiguous non-empty runs of similar total.

    Contiguous, because the batcher hands packs over sorted by length: neighbours have similar
    lengths, so each run stays lightly padded. Run j ends where the running total first reaches
    j/parts of the whole.
    """
    n = len(costs)
    if n == 0:
        return []
    parts = max(1, min(parts, n))
    total = sum(costs)
    cuts, start, running = [], 0, 0
    for i, cost in enumerate(costs):
        running += cost
        remaining_items, remaining_parts = n - i - 1, parts - len(cuts) - 1
        full = running * parts >= total * (len(cuts) + 1)
        if remaining_parts and (full or remaining_items == remaining_parts):
            cuts.append((start, i + 1))
            start = i + 1
    cuts.append((start, n))
    return cuts


class CPUStreams:
    """`streams` worker threads with `threads_per_stream` torch threads each."""

    def __init__(self, streams: int, threads_per_stream: int) -> None:
        if streams < 2:
            raise ValueError(f"streams={streams}: CPUStreams needs at least 2")
        self.streams = streams
        process_default = torch.get_num_threads()
        started = threading.Barrier(streams + 1)

        def init() -> None:
            torch.get_num_threads()  # torch's lazy per-thread init first, or it would undo ours
            torch.set_num_threads(threads_per_stream)
            started.wait()

        self._pool = ThreadPoolExecutor(streams, "opd-stream", initializer=init)
        for _ in range(streams):  # start every thread now, while we can restore the default
            self._pool.submit(lambda: None)
        started.wait()
        torch.set_num_threads(process_default)
        logger.info(
            "%d CPU streams of %d torch threads each (process default %d)",
            streams,
            threads_per_stream,
            process_default,
        )

    def map(self, fn: Callable[[T], R], parts: Sequence[T]) -> list[R]:
        """fn over parts, one part per stream at a time; results in the order of parts."""
        return list(self._pool.map(fn, parts))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def stream_layout(streams: int | None, threads: int, device: str) -> tuple[int, int]:
    """(streams, threads per stream) for a backend on `device` with `threads` torch threads.

    Unset: two streams on a CPU with two or more threads, one elsewhere. GPUs always get one:
    their kernels are already asynchronous, and concurrent passes would only contend for memory.
    """
    if not device.startswith("cpu"):
        return 1, threads
    n = streams if streams is not None else (2 if threads >= 2 else 1)
    n = max(1, min(n, threads))
    return n, max(1, threads // n)
