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
from pathlib import Path

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
    return path


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
