"""Prometheus metrics of one app instance, on its own registry (tests run several apps at once).

What to alert on (docs/operations.md): opd_queue_tokens near max_queue_tokens,
opd_expected_queue_wait_seconds near max_queue_wait_s, a rising rate of
opd_requests_total{status="429"} or {status="500"}, opd_request_latency_seconds p99, and a low
opd_batch_fill (padding waste).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_FILL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "opd_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "opd_request_latency_seconds",
            "request latency by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.scored_tokens = Counter("opd_scored_tokens", "positions scored", registry=r)
        self.input_tokens = Counter("opd_input_tokens", "tokens submitted for scoring", registry=r)
        self.generated_tokens = Counter(
            "opd_generated_tokens", "completion tokens sampled by POST /v1/generate", registry=r
        )
        self.bytes_in = Counter("opd_payload_bytes_in", "request body bytes", ["route"], registry=r)
        self.bytes_out = Counter(
            "opd_payload_bytes_out", "response body bytes", ["route"], registry=r
        )
        self.batch_sequences = Histogram(
            "opd_batch_sequences", "sequences per forward pass", buckets=_COUNT_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "opd_batch_tokens", "real tokens per forward pass", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.batch_fill = Histogram(
            "opd_batch_fill",
            "real / padded tokens per forward pass (1 = no padding)",
            buckets=_FILL_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "opd_forward_seconds", "model time per pack", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_tokens = Gauge("opd_queue_tokens", "tokens waiting or running", registry=r)
        self.queue_sequences = Gauge("opd_queue_sequences", "sequences waiting", registry=r)
        self.expected_wait = Gauge(
            "opd_expected_queue_wait_seconds",
            "queued tokens / measured tokens per second: what admission compares with "
            "max_queue_wait_s",
            registry=r,
        )
        self.queue_wait = Histogram(
            "opd_queue_wait_seconds",
            "score requests: arrival to their first forward pass starting",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_pass = Histogram(
            "opd_time_to_first_pass_seconds",
            "score requests: arrival to their first forward pass finishing",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.deadline_dropped = Counter(
            "opd_deadline_dropped",
            "requests whose X-OPD-Deadline passed in the queue (408, nothing computed)",
            registry=r,
        )
        self.rate_limited = Counter(
            "opd_rate_limited", "requests refused by a per-key rate limit (429)", registry=r
        )
        self.in_flight = Gauge("opd_in_flight_requests", "requests being handled", registry=r)
        self.ready = Gauge("opd_ready", "1 when the model is loaded and warmed up", registry=r)
        self.backend_info = Gauge(
            "opd_backend_info",
            "1, labelled with how this replica runs its model (CPU streams, the streams' BLAS)",
            ["backend", "device", "streams", "cpu_gemm"],
            registry=r,
        )
