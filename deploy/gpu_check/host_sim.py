"""A Python on this machine that sees only the GPU host's packages, for the CPU mode's test.

    python deploy/gpu_check/host_sim.py OUT_DIR      # prints OUT_DIR/venv/bin/python

The GPU host has torch, transformers, numpy, httpx... but no pydantic, FastAPI or uvicorn, and
nothing can be installed there but the wheels we carry. Running the CPU mode with the project's
own .venv would hide a wheel missing from deploy/gpu_check/requirements.txt, since .venv has
everything. So this builds a venv (no site-packages of its own) whose only other entry on sys.path
is a folder of symbolic links to the distributions of the running interpreter that the host also
has (deploy/gpu_check/host-packages.txt). deploy/gpu-check.sh then installs the carried wheels
and opd into it exactly as on the host, and whatever they lack fails here as it would there.

Limits: versions are this machine's (torch 2.13 CPU, not 2.11 CUDA), and a package the host has
but this interpreter lacks is simply absent (the check never needs one of those).
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path

HERE = Path(__file__).resolve().parent


def normalize(name: str) -> str:
    """PEP 503 form, so 'typing_extensions' in metadata matches 'typing-extensions' in lists."""
    return re.sub(r"[-_.]+", "-", name).lower()


def host_packages(path: Path = HERE / "host-packages.txt") -> set[str]:
    """Normalized names of the host's packages (comments and blank lines skipped)."""
    lines = path.read_text().splitlines()
    return {normalize(line.strip()) for line in lines if line.strip() and not line.startswith("#")}


def carried_packages(path: Path = HERE / "requirements.txt") -> set[str]:
    """Normalized names of the carried wheels (requirements.txt, `name==version` lines)."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(normalize(re.split(r"[=<>!~;\[ ]", line, maxsplit=1)[0]))
    return names


def with_dependencies(names: set[str], exclude: set[str]) -> set[str]:
    """`names` and, transitively, what their installed versions here require.

    The host's own versions have their dependencies installed there; ours may need others
    (this machine's huggingface_hub needs httpx2, the host's does not exist here), so the
    simulation follows the local requirements. Carried packages stay out (`exclude`): that a
    local version of a host package needs pydantic does not put pydantic on the host."""
    from packaging.requirements import Requirement

    by_name = {normalize(d.metadata["Name"] or ""): d for d in distributions()}
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name in seen or (name in exclude and name not in names) or name not in by_name:
            continue
        seen.add(name)
        for spec in by_name[name].requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalize(req.name))
    return seen


def top_level_entries(allowed: set[str]) -> tuple[set[str], set[str]]:
    """(entries of site-packages that belong to allowed distributions, names linked).

    Taken from each distribution's RECORD: its first path component (package folder, module
    file, .dist-info) under site-packages; scripts (paths leaving site-packages) are skipped."""
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    entries: set[str] = set()
    linked: set[str] = set()
    for dist in distributions():
        name = normalize(dist.metadata["Name"] or "")
        if name not in allowed or dist.files is None:
            continue
        base = Path(str(dist.locate_file(""))).resolve()
        if base != site:  # an editable or out-of-tree install: not a host package
            continue
        linked.add(name)
        for f in dist.files:
            top = f.parts[0]
            if top not in ("..", "__pycache__") and not top.endswith(".pth"):
                entries.add(top)
    return entries, linked


def build(out: Path) -> Path:
    """Create OUT/host-site (links) and OUT/venv whose python sees it; return that python."""
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    host_site = out / "host-site"
    host_site.mkdir(parents=True, exist_ok=True)
    allowed = with_dependencies(host_packages(), exclude=carried_packages())
    entries, linked = top_level_entries(allowed)
    for entry in sorted(entries):
        target = site / entry
        link = host_site / entry
        if target.exists() and not link.exists():
            link.symlink_to(target)
    venv = out / "venv"
    if not (venv / "bin" / "python").exists():
        # --without-pip: pip comes from the host list (the host's python3 has pip), as there
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # A plain path line: the folder goes on sys.path after the venv's own site-packages, as
    # the host's site-packages does for a venv made with --system-site-packages.
    (Path(purelib) / "gpu_check_host_site.pth").write_text(f"{host_site.resolve()}\n")
    (out / "linked.txt").write_text("\n".join(sorted(linked)) + "\n")
    extra = sorted(linked - host_packages())
    (out / "linked-dependencies.txt").write_text("\n".join(extra) + "\n")
    return python


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(build(Path(sys.argv[1]).resolve()))


if __name__ == "__main__":
    main()
