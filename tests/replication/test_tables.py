"""The replication's verdict rules, on hand-made results: each rule must be able to say
"reproduces", and each must flip when the number it rests on goes the other way. The tiny CI
run cannot check this (its verdicts are arbitrary), so these tests are what keeps a rule from
becoming one that cannot fail."""

from __future__ import annotations

import copy
import math

import pytest

from experiments.replication.tables import (
    INCONCLUSIVE,
    NOT,
    PARTLY,
    REPRODUCES,
    XTOK_MARGIN,
    _window,
    compatible_vs_incompatible,
    cross_tokenizer,
    depth,
    no_new_knowledge,
    rescue,
    reverse_distillation,
    write_tables,
)
from tests.replication.handmade import depth_probe, made_to_reproduce, with_accuracies


@pytest.fixture
def results() -> dict:
    """A run in which every finding reproduces."""
    return made_to_reproduce()


def test_every_finding_reproduces_on_a_run_made_to(results, tmp_path):
    verdicts = write_tables(results, tmp_path / "replication.md")
    assert set(verdicts.values()) == {REPRODUCES}, verdicts
    text = (tmp_path / "replication.md").read_text()
    assert text.count(f"Here: **{REPRODUCES}**") == 6


def test_compatible_vs_incompatible_needs_teacher_x_to_clearly_work(results):
    assert compatible_vs_incompatible(results)[1] == REPRODUCES
    # Teacher-x helps by one question's worth: inside the intervals, so only "partly".
    assert compatible_vs_incompatible(with_accuracies(results, opd_from_x=0.72))[1] == PARTLY
    # Both teachers hurt the student, teacher-x less: not a reproduction.
    hurt = with_accuracies(results, opd_from_x=0.60, opd_from_y=0.10)
    assert compatible_vs_incompatible(hurt)[1] == NOT
    swapped = copy.deepcopy(results)
    swapped["probe_before"]["teachers"][1]["metrics"]["overlap/ratio"] = 0.9
    assert compatible_vs_incompatible(swapped)[1] == NOT


def test_no_new_knowledge_flips_on_a_gain_and_says_inconclusive_when_untestable(results):
    assert no_new_knowledge(results)[1] == REPRODUCES
    assert no_new_knowledge(with_accuracies(results, opd_from_same_pipeline=0.90))[1] == PARTLY
    both = with_accuracies(results, opd_from_same_pipeline=0.90, opd_from_self=0.90)
    assert no_new_knowledge(both)[1] == NOT
    # A same-pipeline teacher weaker than the student tests reverse distillation instead.
    assert no_new_knowledge(with_accuracies(results, same_pipeline=0.60))[1] == PARTLY
    # Teacher-x did not move the student either: the budget cannot test the claim.
    assert no_new_knowledge(with_accuracies(results, opd_from_x=0.72))[1] == INCONCLUSIVE
    no_sanity = copy.deepcopy(results)
    no_sanity["probe_before"]["teachers"][3]["verdict"]["class"] = "good"
    assert no_new_knowledge(no_sanity)[1] == INCONCLUSIVE


def test_reverse_distillation_needs_a_fall_beyond_noise_and_drift(results):
    assert reverse_distillation(results)[1] == REPRODUCES
    assert reverse_distillation(with_accuracies(results, reverse=0.97))[1] == PARTLY  # one question
    assert reverse_distillation(with_accuracies(results, reverse=1.0))[1] == NOT
    # OPD with no signal moved the student more than the fall: the fall is not the teacher's.
    drifting = with_accuracies(results, opd_from_self=0.45)
    assert reverse_distillation(drifting)[1] == PARTLY


def test_rescue_needs_a_clear_margin_and_opd_not_to_erode_the_cold_start(results):
    assert rescue(results)[1] == REPRODUCES
    assert (
        rescue(with_accuracies(results, coldstart_plus_opd_from_y=0.08))[1] == NOT
    )  # within noise
    assert (
        rescue(with_accuracies(results, coldstart_sft=0.90))[1] == PARTLY
    )  # OPD eroded the cold start
    # A cold start that already reaches the teacher, held by OPD: still a rescue.
    assert rescue(with_accuracies(results, coldstart_sft=0.62))[1] == REPRODUCES


def test_depth_needs_an_advantage_to_fall_from(results):
    assert depth(results)[1] == REPRODUCES
    flat = copy.deepcopy(results)
    flat["probe_before"]["depth_probe"] = depth_probe({0: (0.20, 0.1, 0.3), 16: (0.15, 0.05, 0.25)})
    assert depth(flat)[1] == PARTLY
    rising = copy.deepcopy(results)
    rising["probe_before"]["depth_probe"] = depth_probe(
        {0: (0.20, 0.1, 0.3), 16: (0.25, 0.15, 0.35)}
    )
    assert depth(rising)[1] == NOT
    none = copy.deepcopy(results)
    none["probe_before"]["depth_probe"] = depth_probe({0: (0.02, -0.05, 0.09), 16: (0.0, 0.0, 0.0)})
    assert depth(none)[1] == INCONCLUSIVE


def test_cross_tokenizer_needs_a_gain_within_the_margin_of_teacher_xs(results):
    text, verdict = cross_tokenizer(results)
    assert verdict == REPRODUCES  # 0.93 vs 0.95: 0.02 short
    row = "| teacher-x-other-tokenizer | two-digit | 1.000 | 0.800 | 1.200 | 0.0100 | 0.50 |"
    assert row in text
    assert "| teacher-x | shared | 1.000 | native | native | native | 0.50 |" in text

    def across(acc: float) -> str:
        return cross_tokenizer(with_accuracies(results, opd_from_x_other_tokenizer=acc))[1]

    # Inside the margin it reproduces; beyond it, a clear gain is only "partly".
    assert across(0.95 - XTOK_MARGIN + 0.01) == REPRODUCES
    assert across(0.95 - XTOK_MARGIN - 0.01) == PARTLY
    assert across(0.72) == NOT  # no clear gain across tokenizers
    assert across(0.99) == REPRODUCES  # better than teacher-x: the claim is "not worse"
    # Teacher-x did not move the student: nothing to be about as good as.
    assert cross_tokenizer(with_accuracies(results, opd_from_x=0.72))[1] == INCONCLUSIVE


def test_windows_are_cut_by_step_so_a_sparse_metric_is_not_the_same_early_and_late():
    run = [{"step": s, "dense": float(s)} for s in range(1, 101)]
    run[2]["sparse"] = 1.0  # logged at step 3 (early) and step 99 (late) only
    run[98]["sparse"] = 9.0
    assert _window(run, "dense", True) == pytest.approx(sum(range(1, 21)) / 20)
    assert _window(run, "dense", False) == pytest.approx(sum(range(81, 101)) / 20)
    assert _window(run, "sparse", True) == 1.0 and _window(run, "sparse", False) == 9.0
    run[98].pop("sparse")
    assert math.isnan(_window(run, "sparse", False))
