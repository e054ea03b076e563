"""Several teacher replicas behind one client: round-robin, with passive ejection.

Requests are spread over the replicas in turn. A replica that fails at the transport level or
answers 503 (draining, loading) is ejected for `cooldown_s`; the failed request is sent again
at once to the next healthy replica, so a replica that dies or drains mid-run costs a retry,
not a training step. Scoring is a pure function of the request, so a request retried on
another replica can never be counted twice. When every replica is ejected, the client falls
back to its ordinary exponential backoff, trying the replica whose ejection ends first, for up
to the client's max_wait_s (a restart of every replica, or of the only one, is waited out).

One Kubernetes Service URL is also fine: it is one "replica" to the client, and the Service
spreads connections itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence


def normalise_urls(urls: str | Sequence[str]) -> list[str]:
    """A URL, a comma-separated list, or a sequence of URLs -> de-duplicated list."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for url in item.split(","):
            url = url.strip().rstrip("/")
            if url and url not in out:
                out.append(url)
    if not out:
        raise ValueError("at least one teacher URL is required")
    return out


class ReplicaSet:
    def __init__(self, urls: str | Sequence[str], cooldown_s: float = 5.0) -> None:
        self.urls = normalise_urls(urls)
        self.cooldown_s = cooldown_s
        self._ejected_until = dict.fromkeys(self.urls, 0.0)
        self._next = 0
        self._lock = threading.Lock()

    def pick(self) -> str:
        """The next healthy replica in turn; if none is healthy, the one back soonest."""
        now = time.monotonic()
        with self._lock:
            for _ in range(len(self.urls)):
                url = self.urls[self._next % len(self.urls)]
                self._next += 1
                if self._ejected_until[url] <= now:
                    return url
            return min(self.urls, key=self._ejected_until.__getitem__)

    def eject(self, url: str) -> None:
        with self._lock:
            self._ejected_until[url] = time.monotonic() + self.cooldown_s

    def healthy(self) -> int:
        now = time.monotonic()
        return sum(1 for t in self._ejected_until.values() if t <= now)
