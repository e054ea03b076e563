"""Peak resident memory of processes, read from /proc (Linux).

VmHWM is the kernel's high-water mark of a process's resident set; writing "5" to
/proc/PID/clear_refs resets it to the current RSS, so a peak can be measured for one phase.
"""

from __future__ import annotations

import contextlib
from pathlib import Path


def _status_kib(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_rss_bytes(pid: int | str = "self") -> int:
    return _status_kib(pid, "VmHWM") * 1024


def rss_bytes(pid: int | str = "self") -> int:
    return _status_kib(pid, "VmRSS") * 1024


def reset_peak(pid: int | str = "self") -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def descendants(pid: int) -> list[int]:
    """pid and every process below it (vLLM's server spawns its engine and workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            children = (
                (task / "children").read_text().split() if (task / "children").exists() else []
            )
            todo.extend(int(c) for c in children)
    return out


def tree_peak_rss_bytes(pid: int) -> int:
    """Sum of the peaks of a process tree: an upper bound on its simultaneous peak."""
    total = 0
    for p in descendants(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += peak_rss_bytes(p)
    return total
