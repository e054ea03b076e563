"""deploy/gpu-check.sh, as far as a CPU machine can take it.

The GPU check runs on a host with no network and only some packages (torch, transformers,
numpy, httpx...; deploy/gpu_check/host-packages.txt); the rest comes as carried wheels. Here:

1. `make gpu-wheels` resolves on this machine's registry for the host (CPython 3.12,
   manylinux x86-64), and the wheels' own requirements are each either carried or on the host.
   Cost: one download of ~4.5 MB (pip's cache makes later runs cheap).
2. The whole script, end to end, in its CPU mode (`--device cpu`: tiny shapes, same phases,
   same code paths) with a Python that sees only the host's packages (host_sim.py) and wheels
   fetched by the same make target for this machine's Python (another ~4.5 MB): a wheel missing
   from the carried set, an opd subpackage missing from the build, or an import the host cannot
   satisfy fails here as it would there. Then the results folder must hold the verdict and
   every phase's report, within what the GPU host hands back (8 files, flat).

What only a GPU can show (CUDA kernels' numerics, nccl, speed and memory at 1B shapes) is not
tested here; docs/operations.md ("GPU check") says how to run it there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "deploy" / "gpu_check"


def _load(name: str):  # noqa: ANN202 (a module)
    """deploy/gpu_check/NAME.py, which holds scripts, not a package."""
    spec = importlib.util.spec_from_file_location(f"gpu_check_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


host_sim = _load("host_sim")

LOCAL_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
# pip download's platform tags cover the GPU host (glibc 2.35+) and this machine alike
HOST_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
    "extra": "",
}


def make_wheels(dest: Path, python: str) -> list[Path]:
    """`make gpu-wheels` for `python` into dest; the wheels it wrote."""
    out = subprocess.run(
        ["make", "-s", "gpu-wheels", f"GPU_WHEELS_DIR={dest}", f"GPU_WHEELS_PYTHON={python}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return sorted(dest.glob("*.whl"))


def wheel_requirements(wheel: Path) -> tuple[str, list[Requirement]]:
    """(normalized name, Requires-Dist lines) from the wheel's METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    name = host_sim.normalize(re.search(r"^Name: (.+)$", text, re.M).group(1).strip())
    reqs = [Requirement(line[len("Requires-Dist:") :].strip()) for line in text.splitlines()
            if line.startswith("Requires-Dist:")]  # fmt: skip
    return name, reqs


def test_gpu_wheels_resolve_for_the_host_and_cover_what_they_need(tmp_path: Path) -> None:
    wheels = make_wheels(tmp_path / "wheels", "3.12")
    carried = host_sim.carried_packages()
    build = host_sim.carried_packages(HERE / "build-requirements.txt")
    names = {wheel_requirements(w)[0] for w in wheels}
    assert names == carried | build, "one wheel per listed package, nothing else"
    assert any("cp312" in w.name and "manylinux" in w.name for w in wheels), "binary wheels"
    host = host_sim.host_packages()
    for wheel in wheels:
        name, reqs = wheel_requirements(wheel)
        if name in build:
            continue  # setuptools only builds opd; its run-time needs are vendored
        for req in reqs:
            if req.marker is None or req.marker.evaluate(HOST_ENV):
                dep = host_sim.normalize(req.name)
                assert dep in carried or dep in host, f"{name} needs {dep}: carry its wheel"
    total = sum(w.stat().st_size for w in wheels)
    assert total < 16 * 2**20, f"the wheels take {total / 2**20:.1f} MiB of the 64 MiB carried"


def test_cpu_mode_end_to_end_on_the_host_packages(tmp_path: Path) -> None:
    """The script in CPU mode, in a Python that sees only the host's packages + the wheels."""
    wheels = tmp_path / "wheels"
    make_wheels(wheels, LOCAL_PYTHON)
    python = host_sim.build(tmp_path / "host")
    probe = subprocess.run(
        [str(python), "-c", "import pydantic"], capture_output=True, text=True, check=False
    )
    assert probe.returncode != 0, "the simulated host must not see this venv's pydantic"
    results = tmp_path / "results"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPD_", "PYTHON", "VIRTUAL_ENV")) and k != "OUT"
    }
    env.update(
        PYTHON=str(python),
        OPD_GPU_WHEELS=str(wheels),
        OPD_GPU_CHECK_WORK=str(tmp_path / "work"),
        OPD_GPU_CHECK_BUDGET_S="420",
    )
    started = time.monotonic()
    out = subprocess.run(
        ["bash", str(ROOT / "deploy" / "gpu-check.sh"), "--device", "cpu", str(results)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    seconds = time.monotonic() - started
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]

    files = sorted(p.name for p in results.iterdir())
    assert all(p.is_file() for p in results.iterdir()) and len(files) <= 8, files
    assert {"summary.md", "summary.json", "numerics.json", "bench.json", "bench-train.json",
            "gpu-check.log", "details.tar.gz"} <= set(files)  # fmt: skip
    summary = json.loads((results / "summary.json").read_text())
    assert summary["passed"] and summary["problems"] == []
    assert [p for p, v in summary["phases"].items() if v["status"] == "ok"] == [
        "install", "models", "numerics", "bench", "bench-train", "fsdp"
    ]  # fmt: skip
    assert summary["carried_kib"]["wheels_kib"] > 0
    assert summary["carried_kib"]["tree_kib"] + summary["carried_kib"]["wheels_kib"] < 64 * 1024

    numerics = json.loads((results / "numerics.json").read_text())
    assert numerics["passed"] and set(numerics["dtypes"]) == {"float32", "bfloat16"}
    f32, bf16 = numerics["dtypes"]["float32"], numerics["dtypes"]["bfloat16"]
    assert max(e["max"] for e in f32["errors"].values()) < 2e-3
    assert 0 < max(e["max"] for e in bf16["errors"].values()) < 2.0
    assert bf16["plain_hf_errors"], "the bfloat16 yardstick was measured"

    # the CPU mode's contenders and flavours (the GPU adds naive HF, longseq and hf-single)
    bench = json.loads((results / "bench.json").read_text())
    assert set(bench["contenders"]) == {"in-process", "http binary c2"}
    assert bench["limit"]["tokens_per_s"] > 0
    train = json.loads((results / "bench-train.json").read_text())
    assert set(train["rollouts"]) == set(train["steps"]) == {"hf-batched"}
    assert train["memory"]["loss_full_peak_bytes"] > 0
    fsdp = summary["sections"]["fsdp"]["figures"]
    assert fsdp["step1_rel_diff"] <= 1e-3

    log = (results / "gpu-check.log").read_text()
    assert "carried:" in log and "install check: every module imports" in log
    print(f"CPU mode end to end: {seconds:.0f} s")


def test_numerics_bounds_reject_what_they_should() -> None:
    """The verdict's rules themselves (no server): float32 is held to 2e-3; bfloat16 to plain
    HF's own errors, never beyond 2 nats, and an exact bfloat16 answer means no bfloat16 ran."""
    numerics = _load("numerics")

    def errors(max_: float, mean: float) -> dict[str, dict[str, float]]:
        return {q: {"max": max_, "mean": mean, "n": 10} for q in numerics.QUANTITIES}

    f32 = numerics.bounds("float32", None)
    assert numerics.check("float32", errors(1e-4, 1e-5), f32) == []
    assert numerics.check("float32", errors(5e-3, 1e-5), f32)  # TF32-sized errors fail
    plain = errors(0.4, 0.06)
    bf16 = numerics.bounds("bfloat16", plain)
    assert numerics.check("bfloat16", errors(0.45, 0.065), bf16) == []
    assert numerics.check("bfloat16", errors(0.45, 0.2), bf16)  # mean far above plain HF's
    assert numerics.check("bfloat16", errors(0.0, 0.0), bf16)  # not bfloat16 at all
    huge = numerics.bounds("bfloat16", errors(1.5, 0.1))
    assert all(b["max"] == 2.0 for b in huge.values())  # the ceiling: a shifted position
    assert numerics.check("bfloat16", errors(0.3, 0.05), {})  # no yardstick: no pass
