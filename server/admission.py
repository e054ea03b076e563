"""Admission control beyond the token bound: client deadlines and per-key rate limits.

Why: a queue bounded only in tokens accepts work it will serve a minute later, and a client
cannot tell a slow teacher from a dead one. The batcher refuses work whose *expected wait*
(queued tokens / measured tokens per second) exceeds `max_queue_wait_s`; this module adds
- the per-request deadline a client may send (`X-OPD-Deadline: <seconds>`): work that cannot
  start within it is refused at once (429), and work still queued when it passes is dropped
  without being computed (408), so a client that gave up costs the teacher nothing;
- an optional token bucket per API key (`rate_limit_rps`, `rate_limit_burst`), so one trainer
  cannot starve the others sharing a teacher.
The deadline travels from the HTTP middleware to the batcher in a ContextVar, so every route
(opd's and the drop-in ones) honours it without passing it through each handler.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextvars import ContextVar
from dataclasses import dataclass

from opd.shared.errors import ContractError

DEADLINE_HEADER = "X-OPD-Deadline"
MAX_DEADLINE_S = 86_400.0

# Absolute time.monotonic() by which the request's work must have started; None = no deadline.
request_deadline: ContextVar[float | None] = ContextVar("opd_request_deadline", default=None)


class DeadlineExceeded(Exception):
    """The client's deadline passed while its work waited in the queue (HTTP 408)."""

    def __init__(self, deadline_s: float) -> None:
        super().__init__(
            f"the request's {DEADLINE_HEADER} of {deadline_s:g}s passed before its work could "
            "start; nothing was computed"
        )
        self.deadline_s = deadline_s


def parse_deadline(value: str | None, now: float | None = None) -> float | None:
    """The absolute monotonic deadline of a header value in seconds (> 0, <= one day)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_DEADLINE_S:  # also refuses nan and inf
        raise ContractError(
            f"{DEADLINE_HEADER} must be a number of seconds in (0, {MAX_DEADLINE_S:g}], "
            f"not {value[:40]!r}",
            field=DEADLINE_HEADER,
            limit=MAX_DEADLINE_S,
            status=400,
            kind="malformed_header",
        )
    return (time.monotonic() if now is None else now) + seconds


def key_id(key: str) -> str:
    """What logs and limits call a key: a short hash, never the key itself."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


class RateLimited(Exception):
    """A key spent its request budget; retry after `retry_after` seconds (HTTP 429)."""

    def __init__(self, key_name: str, rps: float, retry_after: int) -> None:
        super().__init__(
            f"API key {key_name} is over rate_limit_rps={rps:g}; retry after {retry_after}s"
        )
        self.rps = rps
        self.retry_after = retry_after


@dataclass
class _Bucket:
    tokens: float
    updated: float


class KeyRateLimiter:
    """A token bucket per key: `rps` requests per second on average, bursts of `burst`."""

    def __init__(self, rps: float, burst: int) -> None:
        self.rps = rps
        self.burst = max(1, burst)
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key_name: str, now: float | None = None) -> None:
        """Spend one request of `key_name`'s budget, or raise RateLimited."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.setdefault(key_name, _Bucket(float(self.burst), now))
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rps)
        bucket.updated = now
        if bucket.tokens < 1:
            wait = math.ceil((1 - bucket.tokens) / self.rps)
            raise RateLimited(key_name, self.rps, max(1, wait))
        bucket.tokens -= 1
