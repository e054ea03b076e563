"""Where a command's log lines go: everything to the run's log file, only opd's own warnings to
the terminal.

A run's terminal is the user's view of it (a progress line, a table); the libraries under it
(vLLM, torch, transformers) print warnings, loading bars and notices there that say nothing
about the run (Triton missing on CPU, NUMA binding, FutureWarnings). They are kept, in the run
folder's log file beside opd's own INFO lines, where they can be read when something goes
wrong, and the terminal stays readable.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

# Set to 1 to send native stderr to the log file even when stderr is not a terminal (tests).
NATIVE_STDERR_ENV = "OPD_NATIVE_STDERR_TO_LOG"

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _OpdOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "opd" or record.name.startswith("opd.")


def console_and_file_logging(path: Path, console_level: int = logging.WARNING) -> Path:
    """Send every log record (and Python warnings) to `path`, and opd's own records at
    `console_level` or above to the terminal. Returns the log file's path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # vLLM installs its own stdout handler unless told not to; then it logs like any library.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "opd_run_log", False):  # a previous command's, in this process
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.INFO)
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter(FORMAT))
    to_console = logging.StreamHandler()
    to_console.setLevel(console_level)
    to_console.addFilter(_OpdOnly())
    to_console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for handler in (to_file, to_console):
        handler.opd_run_log = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    logging.captureWarnings(True)  # warnings.warn(...) -> the "py.warnings" logger -> the file
    _route_transformers()
    # Progress bars of vLLM's and the hub's loaders (tqdm), here and in engine processes.
    os.environ.setdefault("TQDM_DISABLE", "1")
    if os.isatty(2) or os.environ.get(NATIVE_STDERR_ENV) == "1":
        _native_stderr_to(path)
    return path


def _native_stderr_to(path: Path) -> None:
    """Everything written to standard error goes to the log file: C++ code writing to file
    descriptor 2 (torch's NUMA-binding notice), vLLM's engine processes (they inherit it) and
    Python code writing to sys.stderr (vLLM's weight-loading bars, which ignore TQDM_DISABLE).
    The terminal keeps what the user needs from stderr: opd's own warnings (the console
    handler) and the traceback of an error that ends the command (sys.excepthook). Only for a
    terminal, or when asked: under a test runner the descriptor belongs to its capture."""
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stderr.flush()
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    for handler in logging.getLogger().handlers:
        ours = getattr(handler, "opd_run_log", False)
        if ours and type(handler) is logging.StreamHandler:  # the console one, not the file
            handler.setStream(terminal)

    def excepthook(kind: type[BaseException], error: BaseException, tb: object) -> None:
        traceback.print_exception(kind, error, tb, file=terminal)  # type: ignore[arg-type]
        traceback.print_exception(kind, error, tb, file=sys.stderr)  # type: ignore[arg-type]

    sys.excepthook = excepthook


def _route_transformers() -> None:
    """transformers logs to stderr through a handler of its own and draws loading bars:
    route its records through the root logger (so to the file) and turn the bars off."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # the light install: no transformers, nothing to route
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()
