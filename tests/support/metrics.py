"""Two runs' logged metrics compared step by step (resume, replicas, restarts)."""

from __future__ import annotations

import pytest

# Wall-clock keys: never equal between two runs.
TIMING = ("time/", "throughput/")


def assert_same_metrics(
    expected: list[dict], got: list[dict], rel: float = 1e-5, abs_: float = 1e-6
) -> None:
    """The same steps, and every logged number but the timings equal within rel/abs_ (nan
    equals nan: a diagnostic undefined in one run is undefined in the other)."""
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    for a, b in zip(expected, got, strict=True):
        for key, value in a.items():
            if key.startswith(TIMING) or value is None:
                continue
            assert b[key] == pytest.approx(value, rel=rel, abs=abs_, nan_ok=True), (a["step"], key)
