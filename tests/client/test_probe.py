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
from opd.client.configs.groups import HorizonKnobs
from opd.client.recipes.probe import (
    COMPATIBLE_OVERLAP,
    NO_SIGNAL_KL,
    rank_teachers,
    recommend_horizon,
    sample_prompt_indices,
    verdict,
)
from opd.client.train.positions import PositionStats


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


def _stats_with_overlap(overlap_of_depth, lengths, depth_N=None) -> PositionStats:
    """Hand-made positions whose top-4 overlap is exactly overlap_of_depth(depth) (1.0 or
    0.25): the student's top set is always ids 0-3; the teacher shares all four, or only id 0."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    depths = (
        np.concatenate([np.arange(n) for n in lengths]) if depth_N is None else np.asarray(depth_N)
    )
    full = np.asarray([overlap_of_depth(int(d)) == 1.0 for d in depths])
    n = len(depths)
    logp_NK = np.tile(np.log([0.4, 0.3, 0.2, 0.1]), (n, 1))
    teacher_NK = np.where(full[:, None], [[0, 1, 2, 3]], [[0, 5, 6, 7]])
    return PositionStats(
        student_topk_ids_NK=np.tile([0, 1, 2, 3], (n, 1)),
        student_topk_logp_NK=logp_NK,
        student_token_logp_N=logp_NK[:, 0],
        student_entropy_N=np.ones(n),
        seq_offsets=offsets,
        teacher_token_logp_N=logp_NK[:, 0],
        teacher_cand_logp_NK=logp_NK,
        teacher_topk_ids_Nk=teacher_NK,
        teacher_topk_logp_Nk=logp_NK,
        teacher_entropy_N=np.ones(n),
        depth_N=depth_N,
    ).validate()


def test_recommend_horizon_fixed_where_the_overlap_fades_none_where_it_holds():
    knobs = HorizonKnobs(bucket=8, fade=0.8, min_tokens=4)
    # the overlap falls from 1.0 to 0.25 at depth 24 (bucket 3) and stays there
    fading = recommend_horizon(
        _stats_with_overlap(lambda d: 1.0 if d < 24 else 0.25, [64, 64, 40]), knobs
    )
    assert (fading["recommended"], fading["tokens"], fading["status"]) == ("fixed:24", 24, "fixed")
    assert fading["display"] == "fixed:24" and fading["bucket"] == 8
    assert fading["overlap_by_bucket"] == {
        f"{8 * b}-{8 * b + 7}": (1.0 if b < 3 else 0.25) for b in range(8)
    }
    assert fading["reason"] == (
        "overlap falls below 0.8 x its first-bucket value from depth 24 on "
        "(0-7: 1.000, floor 0.800)"
    )
    # a dip with live buckets after it does not cut (the rule's trailing run)
    dip = recommend_horizon(
        _stats_with_overlap(lambda d: 0.25 if 16 <= d < 24 else 1.0, [64, 64]), knobs
    )
    assert dip["recommended"] is None and dip["status"] == "none"
    # flat: none needed, held to the end of the deepest bucket with >= 4 positions (depth 63:
    # a lone 65-token rollout's positions 56-64 fill bucket 7 but 64 alone is bucket 8, < 4)
    flat = recommend_horizon(_stats_with_overlap(lambda d: 1.0, [64, 65]), knobs)
    assert (flat["recommended"], flat["tokens"], flat["status"]) == (None, None, "none")
    assert flat["holds_to"] == 64 and flat["display"] == "none needed (to 64)"
    assert flat["reason"] == (
        "overlap holds to depth 64: its deepest bucket with 4 positions or more (56-63: 1.000) "
        "is not below 0.8 x its first-bucket value (0-7: 1.000, floor 0.800)"
    )
    # episodes: the absolute depths (context included) decide, not the index in the sequence
    # (two assistant turns of 32 tokens with a 20-token tool result between them: depths 0-31
    # and 52-83; the fade at depth 56 is index 36 of each episode's trained positions)
    turns = np.concatenate([np.arange(32), np.arange(52, 84)])
    depth_N = np.concatenate([turns, turns])
    episode = recommend_horizon(
        _stats_with_overlap(lambda d: 1.0 if d < 56 else 0.25, [64, 64], depth_N), knobs
    )
    assert episode["recommended"] == "fixed:56"
    assert "32-39" not in episode["overlap_by_bucket"]  # the tool result is not scored
    # too short to judge: one bucket with enough positions
    short = recommend_horizon(_stats_with_overlap(lambda d: 1.0, [6, 6]), knobs)
    assert (short["recommended"], short["status"]) == (None, "undetermined")
    assert short["display"] == "undetermined"


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
