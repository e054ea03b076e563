"""`opd bench-train` runs end to end in a tiny configuration (CI proves it works; no timing
asserted): the hf-single and vllm flavours sample and run whole OPD steps against a live
`opd serve` teacher (the embedded SmolLM2), and the student-math memory probe runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def smol4_dir(tmp_path_factory, smollm2_dir):
    from opd.client.train.student import build_layer_subset_student

    return build_layer_subset_student(smollm2_dir, tmp_path_factory.mktemp("smol-keep4"), 4)


def test_opd_bench_train_tiny_configuration(smol4_dir, tmp_path):
    out_dir = tmp_path / "results"
    cmd = [
        sys.executable, "-m", "opd.client.cli", "bench-train",
        "--student", str(smol4_dir), "--rounds", "1",
        "--flavour", "hf-single", "--flavour", "vllm",
        "--rollout-prompts", "2", "--rollout-n", "2", "--rollout-tokens", "6",
        "--step-prompts", "2", "--step-n", "2", "--step-tokens", "6",
        "--math-tokens", "256", "--head-chunk-tokens", "64", "--out-dir", str(out_dir),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = out_dir.glob("bench-train-*.json")
    report = json.loads(path.read_text())
    flavours = {"hf-single", "vllm"}  # hf-batched is hf-single's code with other settings
    assert set(report["rollouts"]) == flavours and set(report["steps"]) == flavours
    for v in report["rollouts"].values():
        assert v["tokens"] > 0 and v["tokens_per_s"] > 0
    for v in report["steps"].values():
        assert v["tokens"] > 0 and v["step_s"] > 0
    assert report["steps"]["vllm"]["sync_s"] > 0  # the engine got the new weights each step
    assert report["steps"]["vllm"]["rounds"][0]["engine_logp_abs_diff_max"] < 1e-3
    mem = report["memory"]
    assert mem["tokens"] == 256 and mem["vocab"] == 49152
    assert all(mem[f"{k}_peak_bytes"] > 0 for k in ("loss_full", "stats_full"))


def test_opd_bench_train_against_trl_tiny_configuration(smol4_dir, tmp_path):
    """`--peer trl`: opd train (sampled, student-topk, a LoRA student) and TRL's
    ServerDistillationTrainer train the same student on one teacher; every final student
    gets the same held-out KL; the table and the ratios come out."""
    out_dir = tmp_path / "results"
    cmd = [
        sys.executable, "-m", "opd.client.cli", "bench-train",
        "--student", str(smol4_dir), "--skip", "rollouts", "--skip", "steps",
        "--skip", "memory", "--peer", "trl", "--peer-steps", "2", "--peer-engine", "hf",
        "--peer-lora-rank", "4", "--step-prompts", "2", "--step-n", "2", "--step-tokens", "6",
        "--heldout-prompts", "2", "--heldout-n", "1", "--out-dir", str(out_dir),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = out_dir.glob("bench-train-*.json")
    peer = json.loads(path.read_text())["peer"]
    table = peer["table"]
    assert set(table) == {
        "opd sampled", "opd student-topk", "opd sampled, no diagnostics", "opd sampled lora-4",
        "trl",
    }  # fmt: skip
    for name, row in table.items():
        assert row["tokens_per_s"] > 0 and row["peak_rss_bytes"] > 0, name
        assert 0 < row["limit_fraction"] < 1, name
        assert row["heldout_kl"] == row["heldout_kl"], name  # a number, not nan
    assert len(peer["runs"]["trl"]["steps"]) == 2
    assert "held-out KL" in (out_dir / path.name.replace(".json", ".md")).read_text()
