"""docs/ is self-contained and docs/architecture.md lists every module of the tree."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "modeling", "server", "client", "bench")


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


def test_architecture_lists_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"`((?:shared|modeling|server|client|bench)/[\w/]+\.py)`", text))
    modules = {
        p.relative_to(ROOT).as_posix()
        for p in _tracked(*(f"{pkg}/*.py" for pkg in PACKAGES))
        if p.name != "__init__.py"
    }
    assert modules - listed == set(), "modules missing from docs/architecture.md"
    assert listed - modules == set(), "docs/architecture.md lists modules that do not exist"


# Built from pieces so that this file does not contain what it looks for.
OUTSIDE = (".." + "/shared", "opd-" + "reference")


def test_no_file_points_outside_the_repository():
    offenders = []
    for path in _tracked("*.py", "*.md", "*.yaml", "*.yml", "*.toml", "Makefile", "*.sh"):
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if any(marker in line for marker in OUTSIDE):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
