"""Start child processes that die with the process that started them, even on SIGKILL.

Why: an `opd quickstart` killed by a test timeout (SIGKILL: no `finally`, no atexit) left its
`opd serve` teacher running as an orphan that held a model in memory. Every process opd starts
(the local teacher, recipe servers, bench contenders) goes through `start_child`, so the rule
lives in one place.

How (Linux): between fork and exec the child asks the kernel for `death_signal` (SIGTERM by
default) when its parent dies: prctl(PR_SET_PDEATHSIG) through ctypes, from `preexec_fn`. The
setting survives exec, so it holds for the program the child runs. SIGTERM rather than SIGKILL
so that `opd serve` (and vLLM's own server) drain and stop their vLLM engine processes instead
of orphaning them in turn: vLLM's engine process does not watch its parent (checked on vLLM
0.32: it outlives a SIGKILLed `opd serve --backend vllm`).

Caveats, all deliberate:
- "Parent" means the *thread* that forked the child: Linux sends the signal when that thread
  exits, even if the rest of the process lives on. `start_child` therefore forks from the main
  thread when called there, and otherwise hands the fork to one spawner thread that lives as
  long as the process, so a child started from a short-lived worker thread survives the worker.
- `preexec_fn` is documented as unsafe in a multi-threaded parent (the forked child could
  deadlock on a lock another thread held). Ours only calls libc functions resolved beforehand
  in the parent (signal, prctl), getppid and _exit: no imports, no locks.
- The parent may die between fork and prctl; the child then sees getppid() differ from the pid
  it was forked from and exits at once instead of running unattached.
- The death signal's disposition is reset to default in the child, so a parent that ignores it
  (SIG_IGN survives exec) cannot hand an unkillable-by-us child on.
- Each child leads its own process group, so that `stop_child` can also remove what it left
  behind (vLLM engine processes of an `opd serve` that was itself SIGKILLed), and so that a
  terminal's Ctrl-C reaches the parent only, which then stops the child in order.
- Not covered: a child that is itself SIGKILLed while its parent is SIGKILLed too leaves its own
  children (vLLM engine processes) behind; nothing is left alive to sweep its group.
- Elsewhere (macOS, Windows) there is no PR_SET_PDEATHSIG: children start normally and die with
  the parent only when the parent gets to `stop_child` (the context managers do); a SIGKILLed
  parent leaves them running there.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SIG_DFL = None  # NULL: what ctypes passes for a c_void_p None


@dataclass(frozen=True)
class _Libc:
    prctl: Callable[..., int]
    signal: Callable[..., int | None]


_libc: _Libc | None = None
_libc_looked_up = False
_spawner: ThreadPoolExecutor | None = None
_lock = threading.Lock()
# Children whose group kill_group already swept: once the leader is reaped its pid (the group
# id) is free for reuse, so a second sweep much later could hit an unrelated group.
_swept: weakref.WeakSet[subprocess.Popen[Any]] = weakref.WeakSet()


def _load_libc() -> _Libc | None:
    """libc's prctl and signal, resolved once in the parent: the forked child must not load
    libraries. None where there is no PR_SET_PDEATHSIG (anything but Linux)."""
    global _libc, _libc_looked_up
    with _lock:
        if not _libc_looked_up:
            _libc_looked_up = True
            if sys.platform.startswith("linux"):
                with contextlib.suppress(OSError, AttributeError):
                    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
                    libc.prctl.restype = ctypes.c_int
                    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
                    libc.signal.restype = ctypes.c_void_p
                    _libc = _Libc(prctl=libc.prctl, signal=libc.signal)
        return _libc


def parent_death_signal_supported() -> bool:
    """Whether children started here get a signal from the kernel when their parent dies."""
    return _load_libc() is not None


def _die_with_parent_hook(death_signal: int) -> Callable[[], None] | None:
    """The `preexec_fn` that ties the child to the calling thread, or None where unsupported."""
    libc = _load_libc()
    if libc is None:
        return None
    parent, sig = os.getpid(), int(death_signal)

    def hook() -> None:  # runs in the child between fork and exec: keep it minimal
        libc.signal(sig, SIG_DFL)  # first, so that the signal kills even before exec
        if libc.prctl(PR_SET_PDEATHSIG, sig, 0) != 0:
            # Popen then raises SubprocessError in the parent: refuse to run untied.
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl: nobody will signal us
            os._exit(125)

    return hook


def _get_spawner() -> ThreadPoolExecutor:
    """One thread that lives as long as the process, to fork children for non-main threads
    (its worker thread only ends at interpreter exit, when the children should go too)."""
    global _spawner
    with _lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(1, thread_name_prefix="opd-child-spawner")
        return _spawner


def start_child(
    args: Sequence[str], *, death_signal: int = signal.SIGTERM, **popen_kwargs: Any
) -> subprocess.Popen[Any]:
    """`subprocess.Popen(args, **popen_kwargs)` for a child that dies with this process.

    The child gets `death_signal` when this process dies (Linux; see the module doc for the
    thread rule and other systems) and leads its own process group. Pick a signal the child
    turns into an orderly exit if it has children of its own. `preexec_fn`,
    `start_new_session` and `process_group` are set here and may not be passed.
    """
    for key in ("preexec_fn", "start_new_session", "process_group"):
        if key in popen_kwargs:
            raise TypeError(f"start_child sets {key} itself")

    def spawn() -> subprocess.Popen[Any]:
        # Built here: the hook records os.getpid() and the thread running spawn() forks.
        hook = _die_with_parent_hook(death_signal)
        group: dict[str, Any] = {"process_group": 0} if os.name == "posix" else {}
        return subprocess.Popen(args, preexec_fn=hook, **group, **popen_kwargs)

    if threading.current_thread() is threading.main_thread():
        return spawn()
    return _get_spawner().submit(spawn).result()


def kill_group(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    """Send `sig` to what remains of the process group `start_child` gave `proc`.

    For after the leader has exited: removes grandchildren it did not stop (an `opd serve`
    that was SIGKILLed leaves its vLLM engine processes behind). While any member lives the
    group id cannot be reused; once none does, the call finds nothing (ProcessLookupError).
    Only the first call per child does anything, so that a much later call cannot reach a group
    that has since taken over the freed id.
    """
    if os.name != "posix" or proc in _swept:
        return
    _swept.add(proc)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_child(
    proc: subprocess.Popen[Any], *, timeout_s: float = 30.0, sig: int = signal.SIGTERM
) -> int:
    """Stop a child from `start_child` in order: `sig`, up to `timeout_s` to exit, then SIGKILL;
    then SIGKILL whatever of its process group is still there. Returns its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    kill_group(proc)
    return int(proc.returncode)
