"""Horizon control and teacher re-anchoring in `opd train`, against a real teacher process.

- a cut position is not in the teacher's request and gets no gradient (fixed token and turn
  horizons, single completions and episodes, every objective);
- re-anchored turns are the teacher's exact /v1/generate output for the exact ids so far, are
  never trained as student samples, and as off-policy targets get the student's -log p;
- with several teachers, the episode's own teacher writes;
- adaptive horizon and re-anchoring resume exactly, and run under torchrun.

Students: `tiny_student_dir` (single completions) and `turn_taking_student_dir` (episodes of
several turns), both over SmolLM2's tokenizer; the teacher is the session's tiny server.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from opd.client.report.build import build_report
from opd.client.train.bridge import rollouts_request
from opd.client.train.metric_log import read_metrics
from opd.client.train.objectives import OBJECTIVES
from opd.client.train.positions import PositionStats, TokenBatch
from opd.client.train.reanchor import target_positions
from opd.client.train.rollout_store import read_rollouts
from opd.client.train.trainer import Trainer
from tests.support.gradients import hidden_row_grad
from tests.support.metrics import assert_same_metrics
from tests.support.reference import ReferenceModel
from tests.support.train_config import train_args, train_config

EPISODES = dict(
    env="followup",
    env_arg=["turns=4"],
    max_turns=4,
    max_new_tokens=6,
    prompts="task:addition:train",
)


class Recording:
    """A rollout engine that records every (prompt ids, returned ids) of the one it wraps."""

    def __init__(self, inner, name: str) -> None:
        self.inner, self.name = inner, name
        self.calls: list[tuple[list[int], list[int]]] = []
        self.client = inner.client

    def sample(self, prompts, params, seeds):
        out = self.inner.sample(prompts, params, seeds)
        for prompt, (s,) in zip(prompts, out, strict=True):
            self.calls.append((list(prompt), s.completion_ids.tolist()))
        return out


def _row_grad(trainer: Trainer, rollouts, targets=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of `rollouts` and which [B, L] rows of the final hidden state got gradient."""
    stats = PositionStats.from_rollouts(rollouts)
    return hidden_row_grad(trainer, TokenBatch.build(rollouts, stats, torch.device("cpu"), targets))


def _assert_rows_within(grad_BL: torch.Tensor, rollouts, extra=None) -> None:
    for b, r in enumerate(rollouts):
        rows = set((r.positions - 1).tolist())
        if extra is not None:
            rows |= set((extra[b] - 1).tolist())
        nonzero = set(torch.nonzero(grad_BL[b]).flatten().tolist())
        assert nonzero <= rows, f"rows outside the trained positions: {sorted(nonzero - rows)}"


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_fixed_token_horizon_cuts_the_request_and_the_gradient(
    tiny_server, tiny_student_dir, tmp_path, objective
):
    config = train_config(
        tiny_student_dir, tiny_server, tmp_path, horizon="fixed:3", objective=objective
    )
    with Trainer(config) as trainer:
        rollouts, metrics = trainer.collect()
        request = rollouts_request(rollouts, trainer.spec)
        for i, r in enumerate(rollouts):
            assert r.completion_len <= 3 and len(r.token_ids) == r.prompt_len + r.completion_len
            assert request.scored_positions(i).max() < r.prompt_len + 3
            assert len(r.teacher_token_logp_T) == r.completion_len
        assert metrics["horizon/tokens"] == 3
        assert metrics["horizon/positions_kept"] == sum(r.completion_len for r in rollouts)
        # 8 new tokens sampled, 3 kept: the tiny student rarely stops before 3
        assert metrics["horizon/positions_cut"] > 0
        cut = metrics["horizon/positions_cut"]
        total = cut + metrics["horizon/positions_kept"]
        assert metrics["horizon/cut_frac"] == pytest.approx(cut / total)
        loss, grad_BL = _row_grad(trainer, rollouts)
        assert torch.isfinite(loss).all()
        _assert_rows_within(grad_BL, rollouts)
        history = trainer.run()
    assert all(math.isfinite(m["train/loss"]) for m in history)


def test_fixed_turn_horizon_keeps_the_first_turns_of_episodes(
    tiny_server, turn_taking_student_dir, tmp_path
):
    config = train_config(
        turn_taking_student_dir, tiny_server, tmp_path, horizon="fixed:1turns", **EPISODES
    )
    with Trainer(config) as trainer:
        rollouts, metrics = trainer.collect()
        request = rollouts_request(rollouts, trainer.spec)
        assert metrics["horizon/turns"] == 1 and metrics["horizon/positions_cut"] > 0
        for i, r in enumerate(rollouts):
            assert len(r.scored_spans) == 1 and len(r.token_ids) == int(r.scored_spans[0, 1])
            np.testing.assert_array_equal(request.scored_positions(i), r.positions)
        assert max(r.episode.turn_correct.__len__() for r in rollouts) >= 2  # env saw more turns
        _, grad_BL = _row_grad(trainer, rollouts)
        _assert_rows_within(grad_BL, rollouts)


def test_reanchored_turns_are_the_teachers_exact_output_and_only_targets(
    tiny_server, tiny_model_dir, turn_taking_student_dir, tmp_path
):
    """prob 1: every turn after the first is the teacher's; as targets they get -log p."""
    config = train_config(
        turn_taking_student_dir,
        tiny_server,
        tmp_path,
        reanchor_prob=1.0,
        reanchor_as="target",
        max_steps=2,
        save_rollouts=True,
        **EPISODES,
    )
    with Trainer(config) as trainer:
        recorder = Recording(trainer.writers[None].engine, "tiny")
        trainer.writers[None].engine = recorder
        rollouts, metrics = trainer.collect()
        written: dict[tuple, list] = {}  # two episodes may share a prefix (the same turn 0)
        for p, out in recorder.calls:
            written.setdefault(tuple(p), []).append(out)
        with_teacher = [r for r in rollouts if r.episode.teacher_spans]
        assert with_teacher, "no episode reached a second turn"
        assert metrics.get("reanchor/teacher_turn_frac", 0) == 0  # logged by train_step
        for r in with_teacher:
            assert len(r.scored_spans) == 1  # the student wrote turn 0 only
            assert r.episode.span_turns in (None, [0])
            for a, b in r.episode.teacher_spans:
                assert r.token_ids[a:b].tolist() in written[tuple(r.token_ids[:a].tolist())]
                assert not set(range(a, b)) & set(r.positions.tolist())  # never a sample
        request = rollouts_request(with_teacher, trainer.spec)
        for i, r in enumerate(with_teacher):
            np.testing.assert_array_equal(request.scored_positions(i), r.positions)
        targets = [target_positions(r) for r in with_teacher]
        loss, grad_BL = _row_grad(trainer, with_teacher, targets)
        n = sum(r.completion_len for r in with_teacher)
        assert loss.shape[0] == n + sum(len(t) for t in targets)
        _assert_rows_within(grad_BL, with_teacher, targets)
        # the target rows are the student's -log p of the teacher's ids (float64 recompute)
        ref = ReferenceModel(Path(config.student.model))
        want = np.concatenate(
            [
                -ref.reference(r.token_ids, None, positions=t).token(r.token_ids[t])
                for r, t in zip(with_teacher, targets, strict=True)
            ]
        )
        np.testing.assert_allclose(loss[n:].numpy(), want, atol=2e-4, rtol=0)
        history = trainer.run()
    assert history[0]["reanchor/prob"] == 1.0 and history[1]["reanchor/prob"] == 0.5
    assert history[0]["reanchor/teacher_turn_frac"] > 0
    assert history[0]["time/reanchor_s"] > 0  # the teacher's writing, timed on its own
    assert history[1]["reanchor/teacher_tokens"] >= 0
    # saved rollouts keep who wrote which turn; the report labels the teacher's turns
    saved = [s.rollout for s in read_rollouts(tmp_path) if s.step == 1]
    assert any(r.episode.teacher_spans for r in saved)
    for r in saved:
        if r.episode.teacher_spans:
            assert r.episode.span_turns == [0]
            assert all(b <= len(r.token_ids) for _, b in r.episode.teacher_spans)
    page = build_report(tmp_path).read_text()
    assert '<span class="role">teacher</span>' in page


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_reanchoring_as_targets_trains_with_every_objective(
    tiny_server, turn_taking_student_dir, tmp_path, objective
):
    config = train_config(
        turn_taking_student_dir,
        tiny_server,
        tmp_path,
        objective=objective,
        reanchor_prob=1.0,
        reanchor_as="target",
        horizon="fixed:2turns",  # turn 1, the teacher's, is kept as a target
        max_steps=1,
        **EPISODES,
    )
    with Trainer(config) as trainer:
        (metrics,) = trainer.run()
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["train/grad_norm"])
    assert metrics["reanchor/teacher_turn_frac"] > 0 and "horizon/cut_frac" in metrics


def test_with_several_teachers_the_episodes_own_teacher_writes(
    tiny_server, turn_taking_student_dir, tmp_path
):
    rows = [
        {"prompt": f"What is {a} + {b}?", "answer": str(a + b), "teacher": t}
        for a, b, t in [(12, 30, "left"), (7, 5, "right"), (40, 2, "left"), (9, 9, "right")]
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = {**EPISODES, "prompts": str(data)}
    config = train_config(
        turn_taking_student_dir,
        [],
        tmp_path / "run",
        teacher=[f"left={tiny_server}", f"right={tiny_server}"],
        reanchor_prob=1.0,
        prompts_per_step=4,
        horizon="adaptive",  # one horizon over every teacher's rollouts
        horizon_bucket=4,
        horizon_warmup_steps=0,
        horizon_min_tokens=1,
        max_steps=2,
        **flags,
    )
    with Trainer(config) as trainer:
        for name in ("left", "right"):
            trainer.writers[name].engine = Recording(trainer.writers[name].engine, name)
        rollouts, _ = trainer.collect()
        for r in rollouts:
            owner = trainer.writers[trainer.owners[r.prompt_index]].engine
            other = trainer.writers["right" if owner.name == "left" else "left"].engine
            for a, _ in r.episode.teacher_spans:
                prefix = r.token_ids[:a].tolist()
                assert any(p == prefix for p, _ in owner.calls)
                assert not any(p == prefix for p, _ in other.calls)
        assert any(r.episode.teacher_spans for r in rollouts)
        history = trainer.run()
    assert all("horizon/cut_frac" in m and "teacher/left/token_share" in m for m in history)


def test_adaptive_horizon_and_reanchoring_resume_exactly(
    tiny_server, turn_taking_student_dir, tmp_path
):
    flags = dict(
        EPISODES,
        horizon="adaptive",
        horizon_bucket=2,
        horizon_warmup_steps=1,
        horizon_min_tokens=1,
        horizon_fade=0.95,
        reanchor_prob=0.6,
        reanchor_decay_steps=4,  # the first part's max_steps is 2: the schedule must not move
        depth_bucket=2,
    )
    student = turn_taking_student_dir
    with Trainer(train_config(student, tiny_server, tmp_path / "full", **flags)) as trainer:
        trainer.run()
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    part = tmp_path / "part"
    with Trainer(train_config(student, tiny_server, part, max_steps=2, **flags)) as trainer:
        trainer.run()
    with Trainer(train_config(student, tiny_server, part, resume="latest", **flags)) as trainer:
        assert trainer.step == 2
        trainer.run()
    resumed = read_metrics(part / "metrics.jsonl")
    assert all("horizon/cut_frac" in m and "reanchor/teacher_turn_frac" in m for m in full)
    assert_same_metrics(full, resumed)
    state = json.loads((part / "checkpoints" / "step_4" / "state.json").read_text())
    assert state["horizon"]["steps"] == 4


def test_torchrun_adaptive_horizon_and_reanchoring(tiny_server, turn_taking_student_dir, tmp_path):
    """2 CPU processes: every rank moves the horizon from the same all-reduced sums."""
    run_dir = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "opd.client.cli"]
    cmd += train_args(
        turn_taking_student_dir,
        tiny_server,
        run_dir,
        env="followup",
        env_arg="turns=3",
        max_turns=3,
        max_new_tokens=6,
        prompts="task:addition:train",
        max_steps=3,
        prompts_per_step=1,
        n_rollouts=2,
        checkpoint_every=3,
        logger="jsonl",
        horizon="adaptive",
        horizon_bucket=2,
        horizon_warmup_steps=1,
        horizon_min_tokens=1,
        reanchor_prob=0.8,
        reanchor_as="target",
    )
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(m["train/loss"]) for m in metrics)
    assert all("horizon/cut_frac" in m and "reanchor/prob" in m for m in metrics)
    state = json.loads((run_dir / "checkpoints" / "step_3" / "state.json").read_text())
    assert state["horizon"]["steps"] == 3
