"""No orphans: every process opd starts dies with its parent, even when the parent is SIGKILLed.

Each test runs a real parent process (a small script under tmp_path) that starts children the
way opd does, prints their pids, and waits; the test SIGKILLs the parent and then waits, with a
generous deadline, for the children to be gone. An orphan is reparented to init or a subreaper,
and one that nobody reaps stays a zombie, which holds no memory: "gone" is "no such process,
a zombie, or the pid now belongs to another process" (checked by its start time).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from opd.client.teacher.child_process import start_child, stop_child

GONE_DEADLINE_S = 60.0  # generous: a teacher drains and unloads before it exits
REPO = Path(__file__).resolve().parents[2]


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): a pid's identity, since pids
    are reused. None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str) -> bool:
    """The very process that had `started` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] == started and fields[0] not in ("Z", "X")


def _wait_gone(pid: int, started: str, deadline_s: float = GONE_DEADLINE_S) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if not _alive(pid, started):
            return True
        time.sleep(0.1)
    return False


@contextmanager
def _parent(script: str, tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """Run `script` as a separate Python parent; SIGKILL it and anything it reported on exit,
    so that a failing test leaves no stray processes either."""
    path = tmp_path / "parent.py"
    path.write_text(textwrap.dedent(script))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.Popen(
        [sys.executable, str(path), *args], stdout=subprocess.PIPE, text=True, env=env
    )
    proc.reported = []  # type: ignore[attr-defined]  # (pid, start time) of its children
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pid, started in proc.reported:  # type: ignore[attr-defined]
            if _alive(pid, started):
                os.kill(pid, signal.SIGKILL)


def _read_pids(proc: subprocess.Popen[str]) -> list[tuple[int, str]]:
    """The pids from the parent's `PIDS ...` line, each with its start time."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("PIDS "):
            pids = [int(p) for p in line.split()[1:]]
            found = [(pid, _start_time(pid)) for pid in pids]
            assert all(started is not None for _, started in found), f"not running: {found}"
            proc.reported.extend(found)  # type: ignore[attr-defined]
            return found  # type: ignore[return-value]
    raise AssertionError(f"the parent exited with {proc.wait()} before it reported its children")


def _kill_parent_and_expect_gone(proc: subprocess.Popen[str], children: list[tuple[int, str]]):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = [pid for pid, started in children if not _wait_gone(pid, started)]
    assert not left, f"alive {GONE_DEADLINE_S:.0f}s after their parent was SIGKILLed: {left}"


def _expect_children_die_with_parent(script: str, tmp_path: Path, *args: str) -> None:
    """Run `script` as the parent, read the children it reports, SIGKILL it, and expect them
    gone."""
    with _parent(script, tmp_path, *args) as proc:
        _kill_parent_and_expect_gone(proc, _read_pids(proc))


# A parent that starts one `sleep` with start_child, after its SETUP line, and waits.
_ONE_SLEEPING_CHILD = """
    import signal, time
    from opd.client.teacher.child_process import start_child

    {setup}
    child = start_child(["sleep", "600"])
    print("PIDS", child.pid, flush=True)
    time.sleep(600)
"""


def test_a_plain_child_dies_with_its_sigkilled_parent(tmp_path):
    _expect_children_die_with_parent(_ONE_SLEEPING_CHILD.format(setup=""), tmp_path)


def test_a_child_started_from_a_finished_thread_lives_until_its_parent_dies(tmp_path):
    """Linux signals the death of the *thread* that forked; start_child forks from a
    long-lived thread instead, so the child outlives the short-lived thread that asked."""
    script = """
        import threading, time
        from opd.client.teacher.child_process import start_child

        box = []
        worker = threading.Thread(target=lambda: box.append(start_child(["sleep", "600"])))
        worker.start()
        worker.join()
        print("PIDS", box[0].pid, flush=True)
        time.sleep(600)
    """
    with _parent(script, tmp_path) as proc:
        children = _read_pids(proc)
        time.sleep(1.0)  # the worker thread has exited; a signal tied to it would be delivered
        assert all(_alive(pid, started) for pid, started in children)
        _kill_parent_and_expect_gone(proc, children)


def test_a_parent_that_ignores_the_death_signal_cannot_pass_that_on(tmp_path):
    """SIG_IGN survives exec; the child resets the death signal so that it still dies."""
    script = _ONE_SLEEPING_CHILD.format(setup="signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    _expect_children_die_with_parent(script, tmp_path)


def test_stop_child_also_removes_what_a_killed_child_left_behind(tmp_path):
    """An `opd serve` SIGKILLed by someone else leaves its vLLM engine processes; the
    parent's stop sweeps the child's process group. Here a shell stands in for the server and
    a background `sleep` for the engine."""
    shell = ["sh", "-c", "sleep 600 & echo $!; wait"]
    child = start_child(shell, stdout=subprocess.PIPE, text=True)
    grandchild, started = 0, None
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        started = _start_time(grandchild)
        assert started is not None
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert _alive(grandchild, started)  # the orphan this is about
        stop_child(child)
        assert _wait_gone(grandchild, started)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        if started is not None and _alive(grandchild, started):
            os.kill(grandchild, signal.SIGKILL)


def test_the_local_teacher_dies_with_its_sigkilled_parent(tmp_path, tiny_model_dir):
    """The reported bug: `opd quickstart` SIGKILLed by a test timeout left its `opd serve`
    behind. Quickstart, the recipes, the bench and the tests all start it with LocalTeacher."""
    script = """
        import sys, time
        from pathlib import Path
        from opd.client.teacher.launch import LocalTeacher

        teacher = LocalTeacher(
            sys.argv[1],
            env={"OPD_LOG_LEVEL": "warning"},
            log_path=Path(sys.argv[2]),
            ready_timeout_s=300,
        )
        teacher.start()
        print("PIDS", teacher.process.pid, flush=True)
        time.sleep(600)
    """
    log = tmp_path / "teacher.log"
    _expect_children_die_with_parent(script, tmp_path, str(tiny_model_dir), str(log))
    # it got the death signal (SIGTERM) and went through its orderly shutdown
    assert "Traceback" not in log.read_text()


def test_a_bench_worker_dies_with_its_sigkilled_bench_and_cleans_up(tmp_path):
    """Bench workers get SIGINT, so a busy one unwinds and runs its exit handlers: a worker
    running vLLM in-process stops its engine process then. A stand-in worker, blocked in a
    long `round`, holds a `sleep` that only its exit handler stops."""
    (tmp_path / "fake_worker.py").write_text(
        textwrap.dedent("""
        import atexit, json, subprocess, time

        engine = subprocess.Popen(["sleep", "600"])
        atexit.register(engine.kill)
        print(json.dumps({"ready": True, "setup": {"engine": engine.pid}}), flush=True)
        time.sleep(600)  # a round that takes long: stdin is not read, EOF goes unnoticed
        """)
    )
    script = """
        import sys, time
        from pathlib import Path
        from opd.bench.contenders import WorkerContender

        worker = WorkerContender(
            "fake", "fake", {}, Path(sys.argv[1]), env={"PYTHONPATH": sys.argv[2]},
            module="fake_worker",
        )
        print("PIDS", worker.proc.pid, worker.setup["engine"], flush=True)
        time.sleep(600)
    """
    _expect_children_die_with_parent(script, tmp_path, str(tmp_path / "worker.log"), str(tmp_path))
