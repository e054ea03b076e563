"""retain_freed_memory: freed activation-sized blocks are reused instead of faulted in again.

Counted in page faults (getrusage), not time: each child process runs the same stack of
SmolLM2-sized MLP blocks twice and counts the minor page faults of the second run.

glibc adapts its mmap threshold as blocks are freed, so its untouched default faults anywhere
from 7k to 60k pages here depending on thread count and history (CI once saw 6.8k). The children
therefore start from glibc's documented initial thresholds (128 KiB), pinned through glibc's own
environment variables so they cannot adapt: a fixed reference. `retain_freed_memory()` must
override them, since mallopt wins over the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from opd.server.allocator import FIXED_INITIAL_THRESHOLDS_ENV

CHILD = """
import resource, sys, torch
import torch.nn.functional as F
from opd.server.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
g = torch.Generator().manual_seed(0)
w_gate, w_up = torch.randn(1536, 576, generator=g), torch.randn(1536, 576, generator=g)
w_down = torch.randn(576, 1536, generator=g)
def forward():  # 12 SmolLM2-sized MLP blocks over 1,024 tokens: MB-sized activations
    x = torch.randn(1024, 576, generator=g) * 1e-3
    for _ in range(12):
        x = x + F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down) * 1e-3
forward()  # warm-up: first-touch faults happen either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
forward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    env = {**os.environ, **FIXED_INITIAL_THRESHOLDS_ENV}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True, env=env
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_retained_blocks_are_reused_without_page_faults() -> None:
    default, retained = faults("default"), faults("retain")
    # glibc's initial thresholds: every MB-sized activation is mmapped, faulted in, unmapped
    # (95,702 faults per pass here, whatever the thread count).
    assert default > 50_000
    # retained: freed blocks are handed out again, already resident (0-2,112 faults here).
    assert retained < default / 20
