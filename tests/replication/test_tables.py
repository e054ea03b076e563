"""The replication's verdict rules, on hand-made results: each rule must be able to say
"reproduces", and each must flip when the number it rests on goes the other way. The tiny CI
run cannot check this (its verdicts are arbitrary), so these tests are what keeps a rule from
becoming one that cannot fail."""

from __future__ import annotations

import copy
import math

import pytest

from experiments.replication.plan import OPD_RUNS
from experiments.replication.tables import (
    INCONCLUSIVE,
    NOT,
    PARTLY,
    REPRODUCES,
    _window,
    compatible_vs_incompatible,
    depth,
    no_new_knowledge,
    rescue,
    reverse_distillation,
    write_tables,
)

HALF = 0.05  # the half-width of every hand-made 95% interval


def _acc(value: float) -> dict:
    return {"accuracy": value, "ci": [max(0.0, value - HALF), min(1.0, value + HALF)]}


def _teacher(name: str, overlap: float, kl: float, verdict: str) -> dict:
    return {
        "name": name,
        "metrics": {
            "overlap/ratio": overlap,
            "overlap/token_advantage": 0.0,
            "entropy/gap": 0.0,
            "kl/sampled": kl,
        },
        "verdict": {"class": verdict},
        "outcome": {"auroc": 0.9},
    }


def _depth(advantages: dict[int, tuple[float, float, float]]) -> dict:
    return {
        "by_prefix": [
            {
                "prefix_tokens": p,
                "rollouts": 128,
                "teachers": {"teacher-x": {"advantage": a, "advantage_ci": [lo, hi]}},
            }
            for p, (a, lo, hi) in advantages.items()
        ]
    }


def _run(steps: int = 10) -> list[dict]:
    return [
        {"step": s, "overlap/ratio": 0.5 + 0.01 * s, "reward/seq_mean@depth0-7": -0.1}
        for s in range(1, steps + 1)
    ]


@pytest.fixture
def results() -> dict:
    """A run in which every finding reproduces."""
    accuracy = {
        "student": 0.70,
        "teacher-x": 1.00,
        "teacher-y": 1.00,
        "same-pipeline": 0.75,
        "opd-from-x": 0.95,
        "opd-from-y": 0.05,
        "opd-from-same-pipeline": 0.71,
        "opd-from-self": 0.69,
        "reverse": 0.80,
        "coldstart-sft": 0.40,
        "coldstart+opd-from-y": 0.60,
    }
    return {
        "tiny": False,
        "seed": 0,
        "accuracy": {k: _acc(v) for k, v in accuracy.items()},
        "probe_before": {
            "teachers": [
                _teacher("teacher-x", 0.70, 0.10, "good"),
                _teacher("teacher-y", 0.35, 8.0, "borderline"),
                _teacher("same-pipeline", 0.70, 0.05, "good"),
                _teacher("student", 1.00, 0.00, "no-signal"),
            ],
            "depth_probe": _depth({0: (0.20, 0.10, 0.30), 8: (0.10, 0.0, 0.2), 16: (0.05, 0, 0.1)}),
        },
        "probe_after": {"depth_probe": _depth({0: (0.01, 0.0, 0.03), 16: (0.0, 0.0, 0.0)})},
        "runs": {label: _run() for label in OPD_RUNS},
        "plan": {
            "models": [
                {"name": n, "role": n, "style": "x"}
                for n in ("student", "teacher-x", "teacher-y", "same-pipeline")
            ]
        },
        "timing": {"total_s": 1.0, "models_s": 1.0},
    }


def _with(results: dict, **accuracies: float) -> dict:
    changed = copy.deepcopy(results)
    for label, value in accuracies.items():
        changed["accuracy"][label.replace("_", "-").replace("-plus-", "+")] = _acc(value)
    return changed


def test_every_finding_reproduces_on_a_run_made_to(results, tmp_path):
    verdicts = write_tables(results, tmp_path / "replication.md")
    assert set(verdicts.values()) == {REPRODUCES}, verdicts
    text = (tmp_path / "replication.md").read_text()
    assert text.count(f"Here: **{REPRODUCES}**") == 5


def test_compatible_vs_incompatible_needs_teacher_x_to_clearly_work(results):
    assert compatible_vs_incompatible(results)[1] == REPRODUCES
    # Teacher-x helps by one question's worth: inside the intervals, so only "partly".
    assert compatible_vs_incompatible(_with(results, opd_from_x=0.72))[1] == PARTLY
    # Both teachers hurt the student, teacher-x less: not a reproduction.
    hurt = _with(results, opd_from_x=0.60, opd_from_y=0.10)
    assert compatible_vs_incompatible(hurt)[1] == NOT
    swapped = copy.deepcopy(results)
    swapped["probe_before"]["teachers"][1]["metrics"]["overlap/ratio"] = 0.9
    assert compatible_vs_incompatible(swapped)[1] == NOT


def test_no_new_knowledge_flips_on_a_gain_and_says_inconclusive_when_untestable(results):
    assert no_new_knowledge(results)[1] == REPRODUCES
    assert no_new_knowledge(_with(results, opd_from_same_pipeline=0.90))[1] == PARTLY
    both = _with(results, opd_from_same_pipeline=0.90, opd_from_self=0.90)
    assert no_new_knowledge(both)[1] == NOT
    # A same-pipeline teacher weaker than the student tests reverse distillation instead.
    assert no_new_knowledge(_with(results, same_pipeline=0.60))[1] == PARTLY
    # Teacher-x did not move the student either: the budget cannot test the claim.
    assert no_new_knowledge(_with(results, opd_from_x=0.72))[1] == INCONCLUSIVE
    no_sanity = copy.deepcopy(results)
    no_sanity["probe_before"]["teachers"][3]["verdict"]["class"] = "good"
    assert no_new_knowledge(no_sanity)[1] == INCONCLUSIVE


def test_reverse_distillation_needs_a_fall_beyond_noise_and_drift(results):
    assert reverse_distillation(results)[1] == REPRODUCES
    assert reverse_distillation(_with(results, reverse=0.97))[1] == PARTLY  # one question
    assert reverse_distillation(_with(results, reverse=1.0))[1] == NOT
    # OPD with no signal moved the student more than the fall: the fall is not the teacher's.
    drifting = _with(results, opd_from_self=0.45)
    assert reverse_distillation(drifting)[1] == PARTLY


def test_rescue_needs_a_clear_margin_and_opd_not_to_erode_the_cold_start(results):
    assert rescue(results)[1] == REPRODUCES
    assert rescue(_with(results, coldstart_plus_opd_from_y=0.08))[1] == NOT  # within noise
    assert rescue(_with(results, coldstart_sft=0.90))[1] == PARTLY  # OPD eroded the cold start
    # A cold start that already reaches the teacher, held by OPD: still a rescue.
    assert rescue(_with(results, coldstart_sft=0.62))[1] == REPRODUCES


def test_depth_needs_an_advantage_to_fall_from(results):
    assert depth(results)[1] == REPRODUCES
    flat = copy.deepcopy(results)
    flat["probe_before"]["depth_probe"] = _depth({0: (0.20, 0.1, 0.3), 16: (0.15, 0.05, 0.25)})
    assert depth(flat)[1] == PARTLY
    rising = copy.deepcopy(results)
    rising["probe_before"]["depth_probe"] = _depth({0: (0.20, 0.1, 0.3), 16: (0.25, 0.15, 0.35)})
    assert depth(rising)[1] == NOT
    none = copy.deepcopy(results)
    none["probe_before"]["depth_probe"] = _depth({0: (0.02, -0.05, 0.09), 16: (0.0, 0.0, 0.0)})
    assert depth(none)[1] == INCONCLUSIVE


def test_windows_are_cut_by_step_so_a_sparse_metric_is_not_the_same_early_and_late():
    run = [{"step": s, "dense": float(s)} for s in range(1, 101)]
    run[2]["sparse"] = 1.0  # logged at step 3 (early) and step 99 (late) only
    run[98]["sparse"] = 9.0
    assert _window(run, "dense", True) == pytest.approx(sum(range(1, 21)) / 20)
    assert _window(run, "dense", False) == pytest.approx(sum(range(81, 101)) / 20)
    assert _window(run, "sparse", True) == 1.0 and _window(run, "sparse", False) == 9.0
    run[98].pop("sparse")
    assert math.isnan(_window(run, "sparse", False))
