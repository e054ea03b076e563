"""`python -m experiments.longhorizon --tiny` as CI runs it: the real command, a real `opd serve`
teacher per seed, every stage (SFT of the pair, probe, the three OPD arms, eval) on toy
budgets. It checks that the command completes and writes every table with a computed verdict
and every arm and seed into results.json, not what the study finds (docs/long-horizons.md).

It runs the default seeds (0, 1, 2), as `make longhorizon` does: about 50 s on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.longhorizon.plan import ARMS, STUDENT, TEACHER, tiny_plan
from experiments.longhorizon.tables import (
    BEATS,
    COSTS,
    FADES,
    HELPS,
    HURTS,
    MATCHES,
    NO_DIFF,
    NO_FADE,
    NO_SAVING,
    SOME_FADE,
)

ROOT = Path(__file__).resolve().parents[2]
SEEDS = (0, 1, 2)  # the default of --seeds


@pytest.fixture(scope="module")
def studied(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("longhorizon")
    done = subprocess.run(
        [sys.executable, "-m", "experiments.longhorizon", "--tiny", "--out-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,  # inside pytest's 600 s, so the command's own output is reported
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "## 1. Plain OPD vs --horizon adaptive" in done.stdout  # the tables are printed
    return out


def test_every_table_is_written_with_its_rule_and_verdict(studied):
    text = (studied / "longhorizon.md").read_text()
    assert text.startswith("# Long horizons") and "(tiny mode" in text.splitlines()[0]
    for number in range(3):
        section = text.split(f"## {number}. ")[1].split("\n## ")[0]
        assert "|---|" in section  # a markdown table
        assert "Rule (fixed before the run)" in section
        assert "Here: **" in section
    verdicts = json.loads((studied / "results.json").read_text())["verdicts"]
    assert verdicts["adaptive"] in (MATCHES, BEATS, COSTS, NO_SAVING)
    assert verdicts["reanchor"] in (HELPS, HURTS, NO_DIFF)
    assert verdicts["premise"] in (FADES, NO_FADE, SOME_FADE) or verdicts["premise"].startswith(
        "n/a"
    )
    for key in ("adaptive", "reanchor", "premise"):
        assert f"Here: **{verdicts[key]}**" in text


def test_every_arm_and_seed_left_its_numbers(studied):
    results = json.loads((studied / "results.json").read_text())
    plan = tiny_plan(SEEDS[0])
    assert results["seeds"] == list(SEEDS)
    assert set(results["per_seed"]) == {str(s) for s in SEEDS}
    for seed in SEEDS:
        r = results["per_seed"][str(seed)]
        assert set(r["runs"]) == set(ARMS)
        for arm in ARMS:
            steps = r["runs"][arm]
            assert [m["step"] for m in steps] == list(range(1, plan.opd_steps + 1))
            assert all("tokens/count" in m and "time/step_s" in m for m in steps)
            assert r["compute"][arm]["teacher_positions"] > 0
            assert (studied / f"seed{seed}" / "runs" / arm / "checkpoints").is_dir()
        # each arm logged its own feature's metrics, and only its own
        assert all("horizon/positions_kept" in m for m in r["runs"]["adaptive"])
        assert all("reanchor/prob" in m for m in r["runs"]["reanchor"])
        assert not any("reanchor/prob" in m or "horizon/positions_kept" in m
                       for m in r["runs"]["plain"])  # fmt: skip
        for label in (TEACHER, STUDENT, *ARMS):
            acc = r["accuracy"][label]
            assert len(acc["by_turn"]) == plan.turns
            assert all(0.0 <= t["accuracy"] <= 1.0 and len(t["ci"]) == 2 for t in acc["by_turn"])
        metrics = r["probe"]["teachers"][0]["metrics"]
        assert "overlap/ratio@turn0" in metrics
        assert any(k.startswith("overlap/ratio@depth") for k in metrics)
        assert set(r["timing"]) >= {"models_s", "probe_s", "eval_s", "total_s"}
