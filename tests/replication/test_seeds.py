"""The replication over several seeds, on hand-made per-seed results (no training): every figure
of the single-seed tables shows its spread, the verdict over seeds reads the spread (all seeds
and a margin beyond it for "reproduces", most seeds for "partly"), a finished seed is reused,
and `--seeds` refuses what would make a spread meaningless."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from experiments.replication import seeds as seeds_module
from experiments.replication.run import REPLICATE_VERSION, ReplicateConfig, plan_for
from experiments.replication.seeds import (
    across_seeds,
    run_seeds,
    seed_config,
    seed_tables,
    spread_text,
)
from experiments.replication.tables import (
    FINDINGS,
    INCONCLUSIVE,
    NOT,
    PARTLY,
    REPRODUCES,
    Figure,
    compatible_vs_incompatible,
)
from opd.shared.config_cli import config_command
from tests.replication.handmade import made_to_reproduce, with_accuracies


def _section(text: str, number: int) -> str:
    return text.split(f"## {number}. ")[1].split("\n## ")[0]


def test_a_cell_is_the_mean_the_range_and_the_sample_sd():
    figs = [Figure(0.754), Figure(0.793), Figure(0.766)]
    assert spread_text(figs, [0, 1, 2]) == "0.771 (0.754–0.793, sd 0.020)"
    signed = [Figure(0.2, (0.1, 0.3), signed=True), Figure(0.1, (0.0, 0.2), signed=True)]
    assert spread_text(signed, [0, 1]) == "+0.150 (+0.100–+0.200, sd 0.071)"
    assert spread_text([Figure(1.0), Figure(1.0)], [0, 1]) == "1.000 (every seed)"
    classes = [Figure("good"), Figure("borderline"), Figure("good")]
    assert spread_text(classes, [0, 1, 2]) == "good ×2, borderline ×1"
    missing = [Figure(0.5), Figure(float("nan")), Figure(0.7)]
    assert spread_text(missing, [0, 1, 2]) == "0.600 (0.500–0.700, sd 0.141; n/a in seed 1)"
    assert spread_text([Figure(0.5), None], [0, 1]) == "0.500 (seed 0 only)"
    assert spread_text([None, Figure(None)], [0, 1]) == "n/a"


def test_every_figure_of_the_single_seed_tables_shows_its_spread():
    runs = {
        0: with_accuracies(made_to_reproduce(), student=0.754, opd_from_x=0.906),
        1: with_accuracies(made_to_reproduce(), student=0.793, opd_from_x=0.95),
        2: with_accuracies(made_to_reproduce(), student=0.766, opd_from_x=0.93),
    }
    text, summary = seed_tables(runs, {})
    student = "0.771 (0.754–0.793, sd 0.020)"
    assert f"| student | student | x | {student} |" in text  # the models table
    assert f"{student} → 0.929 (0.906–0.950, sd 0.022)" in _section(text, 1)
    assert summary["figures"]["models"]["acc:student"]["values"] == [0.754, 0.793, 0.766]
    # A figure no seed moves is said to be the same, a category is counted.
    assert "| teacher-x | 1.000 (every seed) |" in _section(text, 1)
    assert "no-signal ×3" in _section(text, 2)
    # The same rows and columns as the single-seed table: every cell is a spread.
    single, _ = compatible_vs_incompatible(runs[0])
    table = [line for line in _section(text, 1).splitlines() if line.startswith("| teacher")]
    assert len(table) == 3 and all(line.count("|") == 11 for line in table)
    assert len([line for line in single.splitlines() if line.startswith("| teacher")]) == 3
    # The depth curve and the buckets are there too, one row each.
    assert "| 0 | 128 (every seed) | +0.200 (every seed) | +0.010 (every seed) |" in text
    assert "| 0-7 | -0.100 (every seed) | -0.100 (every seed) |" in text


def test_verdicts_over_seeds_read_every_seed_and_the_spread():
    made = made_to_reproduce()
    clear = {
        0: made,
        1: with_accuracies(made, student=0.71),
        2: with_accuracies(made, student=0.69),
    }
    _, summary = seed_tables(clear, {})
    assert set(summary["verdicts"].values()) == {REPRODUCES}, summary["verdicts"]
    assert all(c["holds"] for checks in summary["comparisons"].values() for c in checks)

    # Finding 1 holds in 2 of 3 seeds: partly.
    one_fails = {**clear, 2: with_accuracies(made, opd_from_x=0.60, opd_from_y=0.10)}
    text, summary = seed_tables(one_fails, {})
    assert summary["per_seed"]["2"]["verdicts"]["compatible_vs_incompatible"] == NOT
    assert summary["verdicts"]["compatible_vs_incompatible"] == PARTLY
    assert "Per seed: seed 0 reproduces, seed 1 reproduces, seed 2 does not reproduce." in text
    assert "| 1. Compatible vs incompatible teacher | reproduces | reproduces | does not " in text

    # ... in 1 of 3: does not reproduce.
    two_fail = {**one_fails, 1: one_fails[2]}
    assert seed_tables(two_fail, {})[1]["verdicts"]["compatible_vs_incompatible"] == NOT

    # Every seed reproduces, but the seeds move the student more than OPD moves it: partly.
    wide = {
        0: with_accuracies(made, student=0.30, opd_from_x=0.45),
        1: with_accuracies(made, student=0.70, opd_from_x=0.95),
    }
    _, summary = seed_tables(wide, {})
    assert [s["verdicts"]["compatible_vs_incompatible"] for s in summary["per_seed"].values()] == [
        REPRODUCES,
        REPRODUCES,
    ]
    assert summary["verdicts"]["compatible_vs_incompatible"] == PARTLY
    check = summary["comparisons"]["compatible_vs_incompatible"][1]
    assert check["comparison"] == "OPD from teacher-x above the student"
    assert check["difference"] == pytest.approx(0.2) and check["spread"] == pytest.approx(0.5)
    assert check["holds"] is False

    # A seed that could not test the claim makes it untested over the seeds.
    untestable = copy.deepcopy(made)
    untestable["probe_before"]["teachers"][3]["verdict"]["class"] = "good"
    _, summary = seed_tables({0: made, 1: made, 2: untestable}, {})
    assert summary["verdicts"]["no_new_knowledge"] == INCONCLUSIVE


def test_the_cross_tokenizer_rule_over_seeds_reads_the_shortfalls_range():
    made = made_to_reproduce()  # opd-from-x at 0.95
    # Every seed within the margin (0.05), but the shortfall ranges over 0.04 with a mean of
    # 0.02: 0.03 left to the margin is not beyond the spread, so only partly.
    runs = {s: with_accuracies(made, opd_from_x_other_tokenizer=0.95 - d)
            for s, d in ((0, 0.0), (1, 0.04), (2, 0.02))}  # fmt: skip
    text, summary = seed_tables(runs, {})
    assert set(summary["per_seed"]["1"]["verdicts"].values()) == {REPRODUCES}
    assert summary["verdicts"]["cross_tokenizer"] == PARTLY
    check = summary["comparisons"]["cross_tokenizer"][1]
    assert check["difference"] == pytest.approx(0.03) and check["spread"] == pytest.approx(0.04)
    assert "| teacher-x-other-tokenizer | two-digit |" in _section(text, 6)
    # The same shortfall in every seed: beyond the spread.
    same = {s: with_accuracies(made, opd_from_x_other_tokenizer=0.93) for s in (0, 1, 2)}
    assert seed_tables(same, {})[1]["verdicts"]["cross_tokenizer"] == REPRODUCES


def test_the_rule_over_seeds():
    R, P, N, I = REPRODUCES, PARTLY, NOT, INCONCLUSIVE  # noqa: E741
    assert across_seeds([R, R, R], beyond=True) == R
    assert across_seeds([R, R, R], beyond=False) == P
    assert across_seeds([R, R, N], beyond=True) == P
    assert across_seeds([P, P, P], beyond=True) == P
    assert across_seeds([R, N, N], beyond=True) == N
    assert across_seeds([R, N], beyond=True) == N  # half is not most
    assert across_seeds([N, N, N], beyond=True) == N
    assert across_seeds([R, R, I], beyond=True) == I


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ("0", "at least 2 seeds"),
        ("0,1,0", "0 given more than once"),
        ("0,x", "comma-separated integers"),
        ("0,-1", "must be >= 0"),
    ],
)
def test_seeds_refuses_one_seed_duplicates_and_non_integers(seeds, message):
    with pytest.raises(ValidationError, match=message):
        ReplicateConfig(seeds=seeds)
    app = typer.Typer()
    app.command()(config_command(ReplicateConfig, lambda _: None, doc="replicate"))
    done = CliRunner().invoke(app, ["--seeds", seeds])
    assert done.exit_code == 2 and "--seeds" in done.output


def test_seeds_parse_and_exclude_seed():
    config = ReplicateConfig(seeds=" 2, 0,1")
    assert config.seeds == "2,0,1" and config.seed_list == [2, 0, 1]
    assert ReplicateConfig(seed=3).seed_list == [3]
    with pytest.raises(ValidationError, match="not both"):
        ReplicateConfig(seed=1, seeds="0,1")
    one = seed_config(ReplicateConfig(seeds="0,1", out_dir="OUT", tiny=True), 1)
    assert (one.seed, one.out_dir, one.tiny, one.seeds) == (1, str(Path("OUT/seed1")), True, None)


def _fake_run(calls: list[int]):
    """run_replicate without training: writes the results.json a finished seed leaves."""

    def run(config: ReplicateConfig, log) -> dict:
        calls.append(config.seed)
        out = Path(config.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        results = with_accuracies(made_to_reproduce(), student=0.70 + 0.01 * config.seed)
        plan = json.loads(json.dumps(asdict(plan_for(config))))
        results.update(seed=config.seed, tiny=config.tiny, version=REPLICATE_VERSION, plan=plan)
        (out / "results.json").write_text(json.dumps(results))
        (out / "replication.md").write_text("# one seed\n")
        return results

    return run


def test_a_finished_seed_of_the_same_plan_is_reused(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(seeds_module, "run_replicate", _fake_run(calls))
    config = ReplicateConfig(seeds="0,1,2", tiny=True, out_dir=str(tmp_path))
    summary = run_seeds(config, log=lambda _: None)
    assert calls == [0, 1, 2] and summary["seeds"] == [0, 1, 2]
    assert set(summary["verdicts"]) == {f.name for f in FINDINGS}
    text = (tmp_path / "replication.md").read_text()
    assert text.startswith("# Replication over seeds 0, 1, 2 (tiny mode")
    assert text.count("Here: **") == len(FINDINGS)
    assert json.loads((tmp_path / "results.json").read_text())["verdicts"] == summary["verdicts"]

    # Seed 1 finished with another plan (a full run, not tiny): only that one runs again.
    saved = json.loads((tmp_path / "seed1" / "results.json").read_text())
    (tmp_path / "seed1" / "results.json").write_text(json.dumps(dict(saved, tiny=False)))
    calls.clear()
    logs: list[str] = []
    summary = run_seeds(config, log=logs.append)
    assert calls == [1]
    assert any(m.startswith("seed 0: reusing") and "not rerunning" in m for m in logs), logs
    assert any(m.startswith("seed 1: running") and "another plan" in m for m in logs), logs
    assert [summary["per_seed"][s]["reused"] for s in ("0", "1", "2")] == [True, False, True]
