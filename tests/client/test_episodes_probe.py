"""`opd probe --env`: the student's episodes scored by a real teacher process, the diagnostics
by assistant turn, and the teacher-continuation depth probe across turns (the environment
replayed through the student's first j turns, then both models play on)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from opd.client.cli import app
from opd.client.train.rollout_store import read_rollouts


def test_probe_reports_the_signal_by_turn_and_continues_episodes_across_turns(
    tiny_server, turn_taking_student_dir, tmp_path
):
    out = tmp_path / "probe"
    args = [
        "probe", "--student", str(turn_taking_student_dir), "--teacher", f"tiny={tiny_server}",
        "--prompts", "task:addition:train", "--num-prompts", "6", "--n-rollouts", "2",
        "--env", "followup", "--env-arg", "turns=3", "--max-turns", "3",
        "--max-new-tokens", "6", "--depth", "--depth-prefix", "0", "--depth-prefix", "1",
        "--depth-samples", "2", "--depth-rollouts", "6", "--out-dir", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "by assistant turn" in result.output and "depth probe across turns" in result.output
    report = json.loads((out / "probe.json").read_text())
    (teacher,) = report["teachers"]
    metrics = teacher["metrics"]
    saved = [s.rollout for s in read_rollouts(out, [0])]
    assert len(saved) == 12 and all(r.episode is not None for r in saved)
    turns = [len(r.scored_spans) for r in saved]
    # every turn reached by some episode has its diagnostics, counted on its own tokens
    for j in range(max(turns)):
        count = sum(
            int(r.scored_spans[j, 1] - r.scored_spans[j, 0])
            for r in saved
            if len(r.scored_spans) > j
        )
        assert metrics[f"tokens/count@turn{j}"] == count
        assert f"overlap/ratio@turn{j}" in metrics and f"kl/sampled@turn{j}" in metrics
    # the sampled KL of turn 0 is the mean over exactly turn 0's positions
    kl0 = np.concatenate(
        [(r.student_token_logp_T - r.teacher_token_logp_T)[r.turn_T == 0] for r in saved]
    )
    assert metrics["kl/sampled@turn0"] == pytest.approx(float(kl0.astype(np.float64).mean()))
    # the student's outcome is the environment's grade
    assert report["student_outcome"]["prompts"] == 6
    depth = report["depth_probe"]
    assert [row["turn"] for row in depth["by_turn"]][0] == 0
    for row in depth["by_turn"]:
        reached = sum(t > row["turn"] for t in turns)
        assert 0 < row["rollouts"] <= reached
        assert 0.0 <= row["student"]["score"] <= 1.0
        assert set(row["teachers"]) == {"tiny"}
