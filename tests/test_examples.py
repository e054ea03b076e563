"""The scripts in examples/ run as documented, against a real `opd serve` process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_student_topk_reverse_kl_step(tiny_server, tiny_student_dir):
    cmd = [
        sys.executable,
        str(EXAMPLES / "student_topk_reverse_kl.py"),
        "--teacher-url", tiny_server,
        "--student", str(tiny_student_dir),
        "--top-k", "8",
        "--max-new-tokens", "12",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    line = done.stdout.strip().splitlines()[-1]
    assert "student-support reverse KL:" in line and "top-k: 8" in line
    kl = float(line.rsplit(":", 1)[1])
    assert kl > 0  # a noised student differs from its teacher on its own support
