"""Reading a real server's /metrics in tests (Prometheus text, parsed by prometheus-client)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def score_requests(url: str, **labels: str) -> float:
    """How many /v1/score requests the server at `url` answered (optionally by status)."""
    text = httpx.get(url + "/metrics").text
    return metric(text, "opd_requests_total", route="/v1/score", **labels)
