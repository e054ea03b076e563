"""Outcome metrics end to end on the embedded model, at small scale, with real processes.

- `opd eval`: the 24-layer student, the teacher's own weights sampled by the student-side
  engine, and the teacher service answering through POST /v1/generate, on the same questions
  and seeds; summaries recomputed from the per-prompt files.
- `opd probe --answer-field --depth`: the reward AUROC recomputed from the saved rollouts by the
  pairwise definition; the depth curve's rows; the report's outcome parts.
- `opd train --eval-set`: accuracy before and after a step, the teacher once, gap recovery.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from opd.client.cli import app
from opd.client.evaluation.stats import gap_recovery, wilson_interval
from opd.client.evaluation.verifiers import load_verifier

pytestmark = pytest.mark.slow
TASK = "task:multiplication:eval"


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


def test_opd_eval_students_and_teacher_on_the_same_questions(
    smol_server, smol_student_dir, smollm2_dir, tmp_path
):
    out = tmp_path / "eval"
    output = _run([
        "eval", "--data", TASK, "--verifier", "numeric", "--limit", "8",
        "--student", str(smol_student_dir), "--student", str(smollm2_dir),
        "--teacher", f"teacher={smol_server}",
        "--max-tokens", "12", "--out-dir", str(out),
    ])  # fmt: skip
    assert "gap recovery" in output
    report = json.loads((out / "eval.json").read_text())
    assert report["items"] == 8 and [s["kind"] for s in report["sources"]] == [
        "student",
        "student",
        "teacher",
    ]
    verifier = load_verifier("numeric")
    texts = {}
    for source in report["sources"]:
        lines = [json.loads(x) for x in (out / source["per_prompt"]).read_text().splitlines()]
        assert len(lines) == 8
        # the summary is what the per-prompt records say, re-graded here
        correct = [verifier(r["completions"][0], r["answer"]).correct for r in lines]
        assert correct == [r["correct"][0] for r in lines]
        m = source["summary"]
        assert m["mean_at_n"] == pytest.approx(np.mean(correct))
        assert m["mean_at_n_interval"] == pytest.approx(list(wilson_interval(sum(correct), 8)))
        assert m["extraction_failures"] == sum(r["extracted"][0] is None for r in lines)
        texts[source["label"]] = [r["completions"][0] for r in lines]
    before, same_weights, teacher = (s["summary"]["mean_at_n"] for s in report["sources"])
    # the teacher's weights answer alike through the engine and through /v1/generate (greedy)
    agree = sum(a == b for a, b in zip(texts[smollm2_dir.name], texts["teacher"], strict=True))
    assert agree >= 6, (texts[smollm2_dir.name], texts["teacher"])
    assert teacher > before  # the pair this task was chosen for
    recovery = report["gap_recovery"][0]
    assert recovery["before"] == smol_student_dir.name and recovery["teacher"] == "teacher"
    assert recovery["gap_recovery"] == pytest.approx(gap_recovery(before, same_weights, teacher))


def test_probe_reward_auroc_and_depth_curve(smol_student_server, smollm2_dir, tmp_path):
    # the full SmolLM2 as the student (it answers some right: both labels occur) and the
    # 24-layer model as the teacher (a real, different policy)
    out = tmp_path / "probe"
    _run([
        "probe", "--student", str(smollm2_dir), "--teacher", f"keep24={smol_student_server}",
        "--prompts", TASK, "--answer-field", "answer", "--verifier", "numeric",
        "--num-prompts", "8", "--n-rollouts", "2", "--max-new-tokens", "12",
        "--depth", "--depth-prefix", "0", "--depth-prefix", "2", "--depth-samples", "1",
        "--depth-temperature", "0", "--depth-rollouts", "4", "--out-dir", str(out),
    ])  # fmt: skip
    probe = json.loads((out / "probe.json").read_text())
    outcome = probe["teachers"][0]["outcome"]
    from opd.client.train.rollout_store import read_rollouts
    from opd.client.train.student import load_student

    _, tokenizer = load_student(str(smollm2_dir))
    from opd.client.evaluation.data import load_eval_set

    answers = {i.index: i.answer for i in load_eval_set(TASK)}
    verifier = load_verifier("numeric")
    rewards, labels = [], []
    for saved in read_rollouts(out):
        r = saved.rollout
        text = tokenizer.decode(r.completion, skip_special_tokens=True)
        labels.append(verifier(text, answers[r.prompt_index]).correct)
        rewards.append(
            float(np.mean(r.teacher_token_logp_T.astype(np.float64) - r.student_token_logp_T))
        )
    assert len(rewards) == 16 and outcome["rollouts"] == 16
    assert probe["student_outcome"]["mean_at_n"] == pytest.approx(np.mean(labels))
    pos = [a for a, y in zip(rewards, labels, strict=True) if y]
    neg = [a for a, y in zip(rewards, labels, strict=True) if not y]
    assert pos and neg, "both right and wrong answers are needed for an AUROC"
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    assert outcome["auroc"] == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-6)
    lo, hi = outcome["auroc_interval"]
    assert 0 <= lo <= outcome["auroc"] <= hi <= 1
    depth = probe["depth_probe"]
    rows = {r["prefix_tokens"]: r for r in depth["by_prefix"]}
    assert set(rows) <= {0, 2} and 0 in rows and rows[0]["rollouts"] == 4
    for row in rows.values():
        t = row["teachers"]["keep24"]
        assert t["advantage"] == pytest.approx(t["accuracy"] - row["student"]["accuracy"])
        assert (
            0 <= t["accuracy"] <= 1
            and t["advantage_ci"][0] <= t["advantage"] <= t["advantage_ci"][1]
        )
    from opd.client.report.build import build_report

    page = build_report(out).read_text()
    assert "Reward AUROC" in page and "fig-probe_depth_continuation" in page


def test_training_logs_accuracy_teacher_and_gap_recovery(smol_server, smol_student_dir, tmp_path):
    from opd.client.train.trainer import Trainer
    from tests.support.train_config import train_config

    config = train_config(
        smol_student_dir,
        smol_server,
        tmp_path,
        prompts="task:multiplication:train",
        max_steps=1,
        max_new_tokens=12,
        lr=1e-5,
        eval_set=TASK,
        eval_limit=6,
        eval_verifier="numeric",
    )
    with Trainer(config) as trainer:
        history = trainer.run()
    lines = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1]  # before, and after the last step
    teacher = json.loads((tmp_path / "eval_teacher.json").read_text())["accuracy"]
    assert teacher > lines[0]["accuracy"]
    for line in lines:
        assert line["teacher_accuracy"] == teacher and line["prompts"] == 6
        expected = gap_recovery(lines[0]["accuracy"], line["accuracy"], teacher)
        assert line["gap_recovery"] == pytest.approx(expected)
    assert history[0]["eval/accuracy"] == lines[1]["accuracy"]
    assert (tmp_path / "eval" / "step_0.jsonl").is_file()
    assert (tmp_path / "eval" / "teacher.jsonl").is_file()
    from opd.client.report.build import build_report

    page = build_report(tmp_path).read_text()
    assert "Accuracy over training" in page and "gap recovery" in page
