"""After the install phase: every command the check runs imports, from the right places.

    PYTHONPATH=SITE python deploy/gpu_check/check_install.py SITE

Fails (exit 1) when
- a module that `opd serve`, `opd bench`, `opd bench-train` or `opd train --fsdp` loads does not
  import: the message names the missing distribution, to be added to requirements.txt (or its
  import made lazy in opd);
- opd is imported from anywhere but SITE (a stale editable install would test other code);
- a carried package or opd has a requirement that nothing installed satisfies (pip check,
  narrowed to those: the host's own unrelated conflicts are not ours to fail on).
Prints where each carried package was found (SITE, or the host's site-packages when the host's
own copy won), with its version.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

HERE = Path(__file__).resolve().parent
# What the phases import up front; the rest (transformers' model code) is torch + transformers,
# which the host has.
MODULES = (
    "opd.client.cli",
    "opd.server.settings",
    "opd.server.app",
    "opd.server.serve",
    "opd.server.backends.hf",
    "opd.bench.runner",
    "opd.bench.worker",
    "opd.bench.train_runner",
    "opd.bench.train_worker",
    "opd.client.train.trainer",
    "opd.client.train.fsdp",
    "opd.client.teacher.launch",
    "torch.distributed.run",
    "transformers",
    "tokenizers",
    "safetensors",
)


def carried() -> list[str]:
    names = []
    for line in (HERE / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[=<>!~; ]", line, maxsplit=1)[0])
    return names


def main() -> None:
    site = Path(sys.argv[1]).resolve()
    problems = []
    for module in MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            problems.append(f"import {module}: {exc} (carry its wheel or make the import lazy)")
    import opd.shared

    where = Path(opd.shared.__file__).resolve()
    if site not in where.parents:
        problems.append(f"opd comes from {where}, not from the install in {site}")
    for name in carried():
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            problems.append(f"{name}: not installed")
            continue
        origin = Path(str(dist.locate_file(""))).resolve()
        place = "carried" if origin == site else f"host ({origin})"
        print(f"  {name} {dist.version}: {place}")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False
    )
    ours = {re.sub(r"[-_.]+", "-", n).lower() for n in [*carried(), "opd"]}
    for line in out.stdout.splitlines():
        first = re.sub(r"[-_.]+", "-", line.split(" ", 1)[0]).lower()
        if first in ours:
            problems.append(f"pip check: {line}")
    import torch

    gpu = torch.cuda.is_available()
    print(f"  torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: {gpu}")
    print(f"  opd from {where.parent.parent}")
    if problems:
        print("install check FAILED:\n  " + "\n  ".join(problems))
        sys.exit(1)
    print("install check: every module imports")


if __name__ == "__main__":
    main()
