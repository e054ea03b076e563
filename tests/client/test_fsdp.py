"""`opd train --fsdp` under torchrun with 2 CPU processes (gloo), and with 1, against a real
teacher.

Greedy rollouts (temperature 0) make the sampled tokens independent of how prompts are split
over ranks, so one FSDP run of 2 x 1 prompt per step and one single-process run of 2 prompts
per step compute the same global batch: their losses, gradient norms and final weights must
agree. A run resumed under FSDP from the first step's checkpoint must reproduce the second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from opd.client.train.metric_log import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def _train(
    student: Path, url: str, run_dir: Path, *extra: str, ranks: int = 1, fsdp: bool = False
) -> None:
    args = [
        "train", "--student", str(student), "--teacher-url", url, "--run-dir", str(run_dir),
        "--max-steps", "2", "--prompts-per-step", str(2 // ranks), "--n-rollouts", "1",
        "--temperature", "0", "--max-new-tokens", "8", "--lr", "1e-3",
        "--objective", "student-topk", "--checkpoint-every", "1", "--logger", "jsonl", *extra,
    ]  # fmt: skip
    if ranks > 1 or fsdp:
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(ranks), "-m"]
        cmd += ["opd.client.cli", *args, "--fsdp"]
    else:
        cmd = [sys.executable, "-m", "opd.client.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _weights(run_dir: Path, step: int) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step_{step}" / "model" / "model.safetensors"))


def test_fsdp_matches_one_process_and_resumes(tiny_server, tiny_student_dir, tmp_path):
    single, sharded, resumed = tmp_path / "single", tmp_path / "fsdp", tmp_path / "resumed"
    _train(tiny_student_dir, tiny_server, single)
    _train(tiny_student_dir, tiny_server, sharded, ranks=2)
    one, two = read_metrics(single / "metrics.jsonl"), read_metrics(sharded / "metrics.jsonl")
    assert [m["step"] for m in two] == [1, 2] and all(m["dist/world_size"] == 2 for m in two)
    for a, b in zip(one, two, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
    w1, w2 = _weights(single, 2), _weights(sharded, 2)
    assert w1.keys() == w2.keys()
    for name in w1:  # the checkpoint is a whole, plain HF model (gathered from the shards)
        assert w1[name].shape == w2[name].shape
        assert float((w1[name] - w2[name]).abs().max()) < 1e-4, name
    # FSDP on one rank (one GPU): torchrun --nproc_per_node 1 joins a one-rank group.
    alone = tmp_path / "fsdp-1"
    _train(tiny_student_dir, tiny_server, alone, ranks=1, fsdp=True)
    for a, b in zip(one, read_metrics(alone / "metrics.jsonl"), strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
    # Resume under FSDP from step 1 (a copy: the run keeps only its last checkpoints).
    start = tmp_path / "step_1"
    shutil.copytree(sharded / "checkpoints" / "step_1", start)
    _train(tiny_student_dir, tiny_server, resumed, "--resume", str(start), ranks=2)
    (again,) = read_metrics(resumed / "metrics.jsonl")
    assert again["step"] == 2
    assert again["train/loss"] == pytest.approx(two[1]["train/loss"], rel=1e-6)
    assert again["train/grad_norm"] == pytest.approx(two[1]["train/grad_norm"], rel=1e-6)
