"""setup.py derives the wheel's packages from the folders holding an __init__.py: a source folder
without one would silently leave the wheel. This checks there is none (fast; the wheel test
builds and installs the real thing)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_source_folder_is_a_package():
    roots = re.findall(r'"opd\.\w+": "(\w+)"', (ROOT / "setup.py").read_text())
    assert set(roots) == {"shared", "modeling", "server", "client", "bench"}
    for root in roots:
        for folder in [ROOT / root, *(p for p in (ROOT / root).rglob("*") if p.is_dir())]:
            if folder.name == "__pycache__":
                continue
            holds_files = any(p.is_file() and p.suffix != ".pyc" for p in folder.iterdir())
            if holds_files:
                assert (folder / "__init__.py").is_file(), f"{folder.relative_to(ROOT)}"
