"""Prometheus metrics of one app instance, on its own registry (tests run several apps at once).

What to alert on (docs/operations.md): opd_queue_tokens near max_queue_tokens,
opd_expected_queue_wait_seconds near max_queue_wait_s, a rising rate of
opd_requests_total{status="429"} or {status="500"}, opd_request_latency_seconds p99, and a low
opd_batch_fill (padding waste).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from opd.shared.packed import PackedResult

# Metric names: what dashboards, alerts (docs/operations.md) and tests query. Prometheus adds
# `_total` to a counter's name and `_bucket` / `_sum` / `_count` to a histogram's.
REQUESTS = "opd_requests"
REQUEST_LATENCY = "opd_request_latency_seconds"
SCORED_TOKENS = "opd_scored_tokens"
INPUT_TOKENS = "opd_input_tokens"
GENERATED_TOKENS = "opd_generated_tokens"
PAYLOAD_BYTES_IN = "opd_payload_bytes_in"
PAYLOAD_BYTES_OUT = "opd_payload_bytes_out"
BATCH_SEQUENCES = "opd_batch_sequences"
BATCH_TOKENS = "opd_batch_tokens"
BATCH_FILL = "opd_batch_fill"
FORWARD_SECONDS = "opd_forward_seconds"
QUEUE_TOKENS = "opd_queue_tokens"
QUEUE_SEQUENCES = "opd_queue_sequences"
EXPECTED_QUEUE_WAIT = "opd_expected_queue_wait_seconds"
QUEUE_WAIT = "opd_queue_wait_seconds"
TIME_TO_FIRST_PASS = "opd_time_to_first_pass_seconds"
DEADLINE_DROPPED = "opd_deadline_dropped"
RATE_LIMITED = "opd_rate_limited"
IN_FLIGHT = "opd_in_flight_requests"
READY = "opd_ready"
BACKEND_INFO = "opd_backend_info"

# Label names.
ROUTE = "route"
STATUS = "status"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_FILL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    """Every metric of one app, and the only code that counts a request, its payload and its
    tokens: opd's routes and the drop-in ones call the same methods, so a drop-in request is
    counted exactly as a native one is."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        def histogram(
            name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
        ) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.requests = Counter(
            REQUESTS, "HTTP requests by route and status", [ROUTE, STATUS], registry=r
        )
        self.latency = histogram(
            REQUEST_LATENCY, "request latency by route", _LATENCY_BUCKETS, (ROUTE,)
        )
        self.scored_tokens = Counter(SCORED_TOKENS, "positions scored", registry=r)
        self.input_tokens = Counter(INPUT_TOKENS, "tokens submitted for scoring", registry=r)
        self.generated_tokens = Counter(
            GENERATED_TOKENS, "completion tokens sampled by POST /v1/generate", registry=r
        )
        self.bytes_in = Counter(PAYLOAD_BYTES_IN, "request body bytes", [ROUTE], registry=r)
        self.bytes_out = Counter(PAYLOAD_BYTES_OUT, "response body bytes", [ROUTE], registry=r)
        self.batch_sequences = histogram(
            BATCH_SEQUENCES, "sequences per forward pass", _COUNT_BUCKETS
        )
        self.batch_tokens = histogram(BATCH_TOKENS, "real tokens per forward pass", _TOKEN_BUCKETS)
        self.batch_fill = histogram(
            BATCH_FILL, "real / padded tokens per forward pass (1 = no padding)", _FILL_BUCKETS
        )
        self.forward_seconds = histogram(FORWARD_SECONDS, "model time per pack", _LATENCY_BUCKETS)
        self.queue_tokens = Gauge(QUEUE_TOKENS, "tokens waiting or running", registry=r)
        self.queue_sequences = Gauge(QUEUE_SEQUENCES, "sequences waiting", registry=r)
        self.expected_wait = Gauge(
            EXPECTED_QUEUE_WAIT,
            "queued tokens / measured tokens per second: what admission compares with "
            "max_queue_wait_s",
            registry=r,
        )
        self.queue_wait = histogram(
            QUEUE_WAIT,
            "score requests: arrival to their first forward pass starting",
            _LATENCY_BUCKETS,
        )
        self.first_pass = histogram(
            TIME_TO_FIRST_PASS,
            "score requests: arrival to their first forward pass finishing",
            _LATENCY_BUCKETS,
        )
        self.deadline_dropped = Counter(
            DEADLINE_DROPPED,
            "requests whose X-OPD-Deadline passed in the queue (408, nothing computed)",
            registry=r,
        )
        self.rate_limited = Counter(
            RATE_LIMITED, "requests refused by a per-key rate limit (429)", registry=r
        )
        self.in_flight = Gauge(IN_FLIGHT, "requests being handled", registry=r)
        self.ready = Gauge(READY, "1 when the model is loaded and warmed up", registry=r)
        self.backend_info = Gauge(
            BACKEND_INFO,
            "1, labelled with how this replica runs its model (CPU streams, the streams' BLAS)",
            ["backend", "device", "streams", "cpu_gemm"],
            registry=r,
        )

    def request_done(self, route: str, status: int, seconds: float) -> None:
        """One answered request, errors included (they are counted by their status)."""
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def payload_in(self, route: str, size: int) -> None:
        self.bytes_in.labels(route).inc(size)

    def payload_out(self, route: str, size: int) -> None:
        self.bytes_out.labels(route).inc(size)

    def scored(self, result: PackedResult) -> None:
        """Tokens submitted and positions scored by one scoring request, whatever its route."""
        self.scored_tokens.inc(int(result.scored_offsets_n1[-1]))
        self.input_tokens.inc(result.input_tokens)
