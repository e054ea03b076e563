"""`opd probe`: verdicts and ranking on constructed numbers, then end to end on the real SmolLM2.

End to end: the 24-layer student samples once; two real teacher services score the same
rollouts: the full SmolLM2 (a real teacher) and the student's own weights (its twin, the
"student == teacher" case). The twin must show no signal and rank last.
"""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from opd.client.cli import app
from opd.client.recipes.probe import (
    COMPATIBLE_OVERLAP,
    NO_SIGNAL_KL,
    rank_teachers,
    sample_prompt_indices,
    verdict,
)


def _metrics(overlap: float, kl: float, adv: float = -0.01, gap: float = 0.2) -> dict:
    return {
        "overlap/ratio": overlap,
        "kl/sampled": kl,
        "overlap/token_advantage": adv,
        "entropy/gap": gap,
    }


def test_verdict_classes_and_reasons():
    good = verdict(_metrics(0.8, 0.5))
    assert good["class"] == "good" and good["compatible"] and good["signal"]
    twin = verdict(_metrics(0.99, 1e-5))
    assert twin["class"] == "no-signal" and not twin["signal"]
    assert any("same model or same pipeline" in r for r in twin["reasons"])
    border = verdict(_metrics(0.4, 0.5))
    assert border["class"] == "borderline" and "coldstart" in border["label"]
    bad = verdict(_metrics(0.05, 2.0, adv=-0.4, gap=1.5))
    assert bad["class"] == "incompatible" and not bad["compatible"]
    assert any("over-confident" in r for r in bad["reasons"])
    assert any("entropy gap" in r for r in bad["reasons"])
    # the thresholds themselves decide
    assert verdict(_metrics(COMPATIBLE_OVERLAP, NO_SIGNAL_KL))["class"] == "good"


def test_ranking_puts_compatibility_first():
    teachers = [
        {"name": "twin", "metrics": _metrics(0.99, 0.0)},
        {"name": "strong-other-style", "metrics": _metrics(0.1, 3.0)},
        {"name": "aligned", "metrics": _metrics(0.7, 0.4)},
        {"name": "aligned-more", "metrics": _metrics(0.8, 0.3)},
        {"name": "down", "error": "TeacherConnectionError"},
    ]
    for t in teachers:
        if "metrics" in t:
            t["verdict"] = verdict(t["metrics"])
    ranked = [t["name"] for t in rank_teachers(teachers)]
    # incompatible but with a signal can be rescued (coldstart); a twin teaches nothing
    assert ranked == ["aligned-more", "aligned", "strong-other-style", "twin", "down"]


def test_prompt_subset_is_seeded():
    a = sample_prompt_indices(100, 10, seed=3)
    assert a == sample_prompt_indices(100, 10, seed=3) and len(set(a)) == 10
    assert a != sample_prompt_indices(100, 10, seed=4)
    assert sample_prompt_indices(5, 10, seed=0) == [0, 1, 2, 3, 4]


def test_probe_end_to_end_real_teacher_versus_twin(
    smol_server, smol_student_server, smol_student_dir, tmp_path
):
    out = tmp_path / "probe"
    args = [
        "probe",
        "--student", str(smol_student_dir),
        "--teacher", f"twin={smol_student_server}",
        "--teacher", f"SmolLM2-30-layers={smol_server}",
        "--num-prompts", "6",
        "--max-new-tokens", "24",
        "--depth-bucket", "8",
        "--out-dir", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "no signal" in result.output and "by depth" in result.output
    report = json.loads((out / "probe.json").read_text())
    assert report["prompts"] == 6 and report["positions"] > 0
    first, second = report["teachers"]
    assert (first["name"], first["rank"]) == ("SmolLM2-30-layers", 1)
    assert (second["name"], second["rank"]) == ("twin", 2)
    twin, real = second["metrics"], first["metrics"]
    # the twin scores the student's tokens exactly as the student does
    assert abs(twin["kl/sampled"]) < 1e-3 and twin["overlap/ratio"] > 0.98
    assert second["verdict"]["class"] == "no-signal"
    # the real teacher disagrees: a clear signal, and less than full overlap
    assert real["kl/sampled"] > 10 * NO_SIGNAL_KL and real["overlap/ratio"] < 0.9
    # the paper's failure regime: this pair starts far below the ~72% of successful runs
    assert first["verdict"]["signal"] and not first["verdict"]["compatible"]
    depth_keys = [k for k in real if k.startswith("overlap/ratio@depth")]
    assert "overlap/ratio@depth0-7" in depth_keys and len(depth_keys) >= 2
    assert np.isfinite(real["entropy/gap"])
    # saved rollouts: the same tokens for both teachers, each with its own scores
    from opd.client.train.rollout_store import read_rollouts

    twin_saved = read_rollouts(out)  # the first teacher's, in OUT_DIR/rollouts
    real_saved = read_rollouts(out / "teachers" / "SmolLM2-30-layers")
    assert len(twin_saved) == len(real_saved) == 6 and {s.step for s in twin_saved} == {0}
    for a, b in zip(twin_saved, real_saved, strict=True):
        assert a.rollout.token_ids.tolist() == b.rollout.token_ids.tolist()
        twin_r = a.rollout
        np.testing.assert_allclose(
            twin_r.teacher_token_logp_T, twin_r.student_token_logp_T, atol=2e-3
        )
    # the report of a real probe: comparison plots and a page naming both teachers
    from opd.client.report.build import build_report

    html = build_report(out)
    assert len(list(html.parent.glob("*.png"))) >= 2
    page = html.read_text()
    assert "twin" in page and "SmolLM2-30-layers" in page
