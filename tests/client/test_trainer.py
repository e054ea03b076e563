"""The trainer against real teacher processes: objectives end to end, resume, learning."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from opd.client.configs.train import TrainConfig
from opd.client.train.metric_log import read_metrics
from opd.client.train.trainer import Trainer
from opd.shared.config_cli import from_flags
from tests.support.cli import run_opd
from tests.support.prom import score_requests
from tests.support.train_config import train_args, train_config

# Keys that depend on wall time, not on what was computed.
_TIMING = ("time/", "throughput/")


@pytest.mark.parametrize(
    "objective,extra",
    [
        ("sampled", {}),
        ("sampled", {"discount": 0.9}),
        ("student-topk", {}),
        ("student-topk", {"topk_variant": "renormalized"}),
        ("student-topk", {"clip_eps": 0.2, "ppo_epochs": 2}),
        ("teacher-topk", {}),
        ("jsd", {"jsd_beta": 0.3}),
        ("overlap-topk", {}),
    ],
)
def test_every_objective_trains_against_a_real_teacher(
    tiny_server, tiny_student_dir, tmp_path, objective, extra
):
    config = train_config(
        tiny_student_dir, tiny_server, tmp_path, objective=objective, max_steps=2, **extra
    )
    with Trainer(config) as trainer:
        history = trainer.run()
    assert len(history) == 2
    for metrics in history:
        assert math.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0
        assert 0 <= metrics["overlap/ratio"] <= 1
        for key in ("kl/sampled", "entropy/gap", "overlap/token_advantage", "reward/seq_mean"):
            assert key in metrics
        assert any(k.startswith("overlap/ratio@depth0-3") for k in metrics)
        for key in ("time/generate_s", "time/score_s", "time/score_wait_s", "time/train_s"):
            assert metrics[key] >= 0
    if extra.get("ppo_epochs") == 2:
        assert history[0]["train/loss_last_epoch"] != history[0]["train/loss"]
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2]


def test_resume_matches_the_uninterrupted_run(tiny_server, tiny_student_dir, tmp_path):
    # with an outcome evaluation every 2 steps: its lines must survive the resume too
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"prompt": f"What is {i} + 1?", "answer": i + 1}) + "\n" for i in range(3)
        )
    )
    evals = dict(eval_set=str(questions), eval_every=2, eval_verifier="numeric",
                 eval_max_new_tokens=4)  # fmt: skip
    with Trainer(
        train_config(tiny_student_dir, tiny_server, tmp_path / "full", **evals)
    ) as trainer:
        trainer.run()
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")

    interrupted = tmp_path / "interrupted"
    first = train_config(tiny_student_dir, tiny_server, interrupted, max_steps=2, **evals)
    with Trainer(first) as trainer:
        trainer.run()
    teacher_cache = interrupted / "eval_teacher.json"
    measured_at = teacher_cache.stat().st_mtime_ns
    # the checkpoint holds no pickle: safetensors and JSON (plus the tokenizer's own files)
    ckpt = interrupted / "checkpoints" / "step_2"
    suffixes = {p.suffix for p in ckpt.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors", ".jinja", ".txt"}, suffixes
    fresh = train_config(tiny_student_dir, tiny_server, tmp_path / "none-yet", resume="auto")
    with Trainer(fresh) as trainer:  # 'auto' with no checkpoint starts fresh
        assert trainer.step == 0 and trainer.resume_from is None
    resumed_config = train_config(
        tiny_student_dir, tiny_server, interrupted, resume="auto", **evals
    )
    with Trainer(resumed_config) as trainer:
        assert trainer.step == 2 and trainer.resume_from == ckpt
        trainer.run()
    resumed = read_metrics(interrupted / "metrics.jsonl")
    # the teacher's accuracy was measured once, and the evaluations (before, 2, 4) match
    assert teacher_cache.stat().st_mtime_ns == measured_at
    lines = [json.loads(x) for x in (interrupted / "eval.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in (tmp_path / "full" / "eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [x["step"] for x in expected] == [0, 2, 4]
    for a, b in zip(lines, expected, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {
            k: v for k, v in b.items() if k != "seconds"
        }
    assert "eval/accuracy" in full[1] and "eval/accuracy" not in full[0]

    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed, strict=True):
        for key, value in a.items():
            if key.startswith(_TIMING) or value is None:
                continue
            assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (a["step"], key)


def test_opd_pulls_the_student_toward_the_teacher(tiny_server, tiny_student_dir, tmp_path):
    config = train_config(
        tiny_student_dir,
        tiny_server,
        tmp_path,
        max_steps=12,
        n_rollouts=4,
        max_new_tokens=16,
        lr=2e-3,
        holdout=8,
    )
    with Trainer(config) as trainer:
        held_out = list(range(trainer.train_size, len(trainer.prompts)))
        before = trainer.evaluate(held_out, n=4, seed=7)
        trainer.run()
        after = trainer.evaluate(held_out, n=4, seed=7)
    assert after["kl/sampled"] < 0.8 * before["kl/sampled"], (before, after)
    assert after["kl/student_topk"] < before["kl/student_topk"]
    assert after["overlap/ratio"] > before["overlap/ratio"]


def test_opd_train_cli(tiny_server, tiny_student_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"q": f"Count to {i}."}) + "\n" for i in range(5)))
    run_dir = tmp_path / "run"
    args = train_args(
        tiny_student_dir,
        tiny_server,
        run_dir,
        prompts=prompts,
        prompt_field="q",
        max_steps=2,
        prompts_per_step=1,
        n_rollouts=2,
        max_new_tokens=6,
        objective="sampled",
        checkpoint_every=1,
    )
    run_opd(args, timeout=300)
    assert len(read_metrics(run_dir / "metrics.jsonl")) == 2
    assert (run_dir / "checkpoints" / "step_2" / "model" / "model.safetensors").is_file()
    assert (run_dir / "tensorboard").is_dir()
    assert json.loads((run_dir / "config.json").read_text())["objective"]["name"] == "sampled"
    assert (run_dir / "train.log").is_file()  # libraries' lines go to the run's log file
    # The config the run wrote replays it: --config alone (plus a new run folder) gives the
    # same first step, every computed metric (rel 1e-4: the teacher's batching, test_faults).
    replay_dir = tmp_path / "replay"
    run_opd(["train", "--config", str(run_dir / "config.json"), "--run-dir", str(replay_dir)], 300)
    first, again = (
        read_metrics(run_dir / "metrics.jsonl")[0],
        read_metrics(replay_dir / "metrics.jsonl")[0],
    )
    computed = [k for k, v in first.items() if not k.startswith(_TIMING) and v is not None]
    assert computed and first["step"] == again["step"] == 1
    for key in computed:
        assert again[key] == pytest.approx(first[key], rel=1e-4, abs=1e-6), key


def test_bad_config_is_refused_naming_the_field(tiny_student_dir):
    with pytest.raises(ValueError, match="objective"):
        from_flags(
            TrainConfig, student=str(tiny_student_dir), teacher_url=["http://x"], objective="nope"
        )
    with pytest.raises(ValueError, match="clip_eps"):
        from_flags(
            TrainConfig,
            student=str(tiny_student_dir),
            teacher_url=["http://x"],
            objective="jsd",
            clip_eps=0.2,
        )


def test_fsdp_outside_torchrun_is_refused_naming_the_field(tiny_server, tiny_student_dir, tmp_path):
    config = train_config(tiny_student_dir, tiny_server, tmp_path, fsdp=True)
    with pytest.raises(ValueError, match="fsdp"):
        Trainer(config)


def test_layer_subset_student(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from opd.client.train.student import build_layer_subset_student, evenly_spaced_layers

    assert evenly_spaced_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert evenly_spaced_layers(30, 24)[0] == 0 and evenly_spaced_layers(30, 24)[-1] == 29
    out = build_layer_subset_student(tiny_model_dir, tmp_path / "s", keep=1)
    student = AutoModelForCausalLM.from_pretrained(out)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert student.config.num_hidden_layers == 1
    torch.testing.assert_close(
        student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight
    )
    ids = torch.tensor([[1, 2, 3]])
    assert np.isfinite(student.generate(ids, max_new_tokens=3, do_sample=False).numpy()).all()


def test_torchrun_two_processes_each_score_their_own_shard(tiny_server, tiny_student_dir, tmp_path):
    """`opd train` under torchrun with 2 CPU processes (gloo): DDP keeps one model, each rank
    sends its own prompts to the teacher, rank 0 logs and checkpoints."""
    before = score_requests(tiny_server)
    run_dir = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "opd.client.cli"]
    cmd += train_args(
        tiny_student_dir,
        tiny_server,
        run_dir,
        prompts="shipped",
        max_steps=2,
        prompts_per_step=1,
        n_rollouts=2,
        max_new_tokens=6,
        checkpoint_every=2,
        logger="jsonl",
        save_rollouts=True,
    )
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]  # rank 0 only writes
    assert all(m["dist/world_size"] == 2 for m in metrics)
    # 2 steps x 2 ranks x 1 prompt each: every rank scored its own shard
    assert score_requests(tiny_server) - before == 4
    ckpt = run_dir / "checkpoints" / "step_2"
    from safetensors.torch import load_file

    assert set(load_file(str(ckpt / "rng.safetensors"))) == {
        "torch_cpu_rank0",
        "torch_cpu_rank1",
    }
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    # rank 0 saves its own shard's rollouts (1 prompt x 2 rollouts) every step
    from opd.client.train.rollout_store import read_rollouts

    saved = read_rollouts(run_dir)
    assert sorted({s.step for s in saved}) == [1, 2] and len(saved) == 4


def test_micro_batches_are_slices_of_the_step_and_accumulate_exactly(
    tiny_server, tiny_student_dir, tmp_path
):
    """One step of 4 rollouts as 4 micro-batches of 1 and as 1 of 8: same loss and gradient
    (the micro-batches are slices of the step's flattened PositionStats)."""
    runs = {}
    for micro in (1, 8):
        config = train_config(
            tiny_student_dir, tiny_server, tmp_path / f"m{micro}", max_steps=1,
            micro_batch_size=micro, objective="student-topk",
        )  # fmt: skip
        with Trainer(config) as trainer:
            (runs[micro],) = trainer.run()
    assert runs[1]["train/loss"] == pytest.approx(runs[8]["train/loss"], rel=1e-5, abs=1e-7)
    assert runs[1]["train/grad_norm"] == pytest.approx(runs[8]["train/grad_norm"], rel=1e-4)


def test_without_diagnostics_the_request_carries_only_what_the_objective_needs(
    tiny_server, tiny_student_dir, tmp_path
):
    config = train_config(
        tiny_student_dir, tiny_server, tmp_path / "lean", max_steps=2, objective="sampled",
        diagnostics=False,
    )  # fmt: skip
    with Trainer(config) as trainer:
        history = trainer.run()
        stats = trainer.stats
    assert stats.teacher_topk_ids_Nk is None and stats.teacher_cand_logp_NK is None
    assert stats.teacher_entropy_N is None and stats.teacher_token_logp_N is not None
    for metrics in history:
        assert math.isfinite(metrics["kl/sampled"]) and "overlap/ratio" not in metrics


def test_the_one_forward_step_matches_the_two_pass_step(tiny_server, tiny_student_dir, tmp_path):
    """The default step (the engine's top-K as candidates, the student's numbers recorded by
    the loss pass, prompts shared, the first decoder forward run while the teacher scores)
    against the step before it (a statistics pass, then the loss; --candidates trainer
    --no-share-prompts): the same samples (same seeds) give the same losses, gradient norms
    and diagnostics, to float32 noise."""
    runs = {}
    for name, extra in (
        ("one", {}),
        ("two", {"candidates": "trainer", "share_prompts": False}),
    ):
        config = train_config(
            tiny_student_dir, tiny_server, tmp_path / name, objective="student-topk",
            max_steps=2, ppo_epochs=2, **extra,
        )  # fmt: skip
        with Trainer(config) as trainer:
            used = _counting_early(trainer)
            runs[name] = (trainer.run(), used)
    (one, used_one), (two, used_two) = runs["one"], runs["two"]
    assert len(used_one) == 2 and all(h is not None for h in used_one)  # overlapped each step
    assert used_two == []  # the two-pass step has its numbers before the loss
    for a, b in zip(one, two, strict=True):
        assert a["student/candidates_differ_frac"] == 0.0  # hf's top-K is the trainer's here
        assert a["time/while_scoring_s"] > 0 and b["time/stats_s"] > 0
        keys = [k for k in b if not k.startswith(_TIMING) and k in a]
        assert "train/loss" in keys and "overlap/ratio" in keys and "kl/student_topk" in keys
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5, nan_ok=True), key


def _counting_early(trainer: Trainer) -> list:
    """Every early decoder forward update() took (None: none had run on those ids)."""
    used: list = []
    take = trainer._take_early

    def counted(batch):  # noqa: ANN001, ANN202
        used.append(take(batch))
        return used[-1]

    trainer._take_early = counted
    return used
