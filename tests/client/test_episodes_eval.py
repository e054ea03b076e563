"""`opd eval --env`: the real SmolLM2 plays the multi-turn follow-up environment as a student
(rollout engine) and as a teacher (POST /v1/generate continuing the episode's exact ids).

Greedy, the teacher's weights give the same episodes through both paths, turn after turn:
the teacher engine continues the very token sequence the student-side runner built.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from opd.client.cli import app

TURNS = 3


def test_opd_eval_plays_episodes_as_student_and_as_teacher(smol_server, smollm2_dir, tmp_path):
    out = tmp_path / "eval"
    args = [
        "eval", "--data", "task:addition:eval", "--limit", "4", "--verifier", "numeric",
        "--student", str(smollm2_dir), "--teacher", f"teacher={smol_server}",
        "--env", "followup", "--env-arg", f"turns={TURNS}", "--max-turns", str(TURNS),
        "--max-tokens", "16", "--out-dir", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    episodes = {}
    for source in report["sources"]:
        m = source["summary"]
        assert m["episodes"] == 4 and 1 <= m["turns_mean"] <= TURNS
        assert len(m["turn_accuracy"]) <= TURNS
        lines = [json.loads(x) for x in (out / source["per_prompt"]).read_text().splitlines()]
        rewards = [r["rewards"][0] for r in lines]
        assert all(0.0 <= x <= 1.0 for x in rewards)
        # an episode is correct exactly when the environment gave it full reward
        assert [r["correct"][0] for r in lines] == [x == 1.0 for x in rewards]
        assert m["reward_mean"] == pytest.approx(np.mean(rewards))
        assert m["mean_at_n"] == pytest.approx(np.mean([x == 1.0 for x in rewards]))
        # per turn index, over the episodes that reached it
        graded = [r["turn_correct"][0] for r in lines]
        want = [np.mean([g[j] for g in graded if len(g) > j]) for j in range(TURNS)]
        assert m["turn_accuracy"] == pytest.approx(want)
        episodes[source["kind"]] = [(r["completions"][0], r["turns"][0]) for r in lines]
    assert max(r for r in report["sources"][0]["summary"]["turn_accuracy"]) > 0  # it can play
    # the same weights, greedy: the same episodes through the engine and through the service
    agree = sum(a == b for a, b in zip(episodes["student"], episodes["teacher"], strict=True))
    assert agree >= 3, episodes
