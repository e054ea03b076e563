"""opd's command line as a child process, as the end-to-end tests run it, and what it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def run_opd(
    args: Sequence[str], timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m opd.client.cli ARGS`; the test fails with the tail of its output unless it
    exits 0."""
    cmd = [sys.executable, "-m", "opd.client.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def only_json(folder: Path, pattern: str) -> tuple[Path, Any]:
    """The one file in `folder` whose name matches `pattern`, and its JSON."""
    (path,) = folder.glob(pattern)
    return path, json.loads(path.read_text())
