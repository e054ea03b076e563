"""The long-horizon study's verdict rules on hand-made numbers (each verdict where the numbers
say so, and flipping when the number it rests on goes the other way), and ChainEnv's grading:
what keeps the study's verdicts honest, since the tiny run cannot (docs/long-horizons.md)."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.longhorizon import task
from experiments.longhorizon.env import ChainEnv, answer_of
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
    ONE_SEED,
    SOME_FADE,
    adaptive_verdict,
    cell,
    premise_verdict,
    reanchor_verdict,
)
from opd.client.episodes import AssistantTurn


def _turn(text: str) -> AssistantTurn:
    return AssistantTurn(text, [], False)


# ---- the rules --------------------------------------------------------------------------------


def test_adaptive_matches_when_cheaper_everywhere_and_within_the_spread():
    plain, adaptive = [0.40, 0.45, 0.50], [0.38, 0.44, 0.47]  # margin 0.10, below by 0.02
    assert adaptive_verdict(plain, adaptive, [100, 100, 100], [60, 70, 80]) == MATCHES


def test_adaptive_costs_accuracy_beyond_the_spread_whatever_it_saves():
    plain, adaptive = [0.40, 0.42, 0.41], [0.20, 0.22, 0.21]  # margin 0.02, below by 0.20
    assert adaptive_verdict(plain, adaptive, [100] * 3, [10] * 3) == COSTS


def test_adaptive_saves_nothing_when_one_seed_scored_as_many_positions():
    plain, adaptive = [0.40, 0.45, 0.50], [0.40, 0.45, 0.50]
    assert adaptive_verdict(plain, adaptive, [100, 100, 100], [60, 100, 80]) == NO_SAVING


def test_adaptive_beats_only_above_in_every_seed_and_beyond_the_spread():
    plain, adaptive = [0.40, 0.41, 0.42], [0.50, 0.51, 0.52]
    assert adaptive_verdict(plain, adaptive, [100] * 3, [50] * 3) == BEATS
    # above on the mean but not in every seed: matches, not beats
    assert adaptive_verdict(plain, [0.39, 0.60, 0.60], [100] * 3, [50] * 3) == MATCHES


def test_rules_need_a_spread():
    assert adaptive_verdict([0.4], [0.5], [100], [50]) == ONE_SEED
    assert reanchor_verdict([0.4], [0.5]) == ONE_SEED


def test_reanchor_helps_hurts_or_no_clear_difference():
    assert reanchor_verdict([0.10, 0.12, 0.11], [0.30, 0.31, 0.32]) == HELPS
    assert reanchor_verdict([0.30, 0.31, 0.32], [0.10, 0.12, 0.11]) == HURTS
    # above in every seed, but by less than the spread
    assert reanchor_verdict([0.10, 0.20, 0.30], [0.15, 0.25, 0.35]) == NO_DIFF
    # beyond the spread on the mean, but not in every seed
    assert reanchor_verdict([0.10, 0.10, 0.40], [0.60, 0.60, 0.35]) == NO_DIFF


def test_premise_fades_in_every_some_or_no_seed():
    assert premise_verdict([0.6, 0.7], [0.4, 0.5], 0.8) == FADES
    assert premise_verdict([0.6, 0.7], [0.55, 0.65], 0.8) == NO_FADE
    assert premise_verdict([0.6, 0.7], [0.4, 0.65], 0.8) == SOME_FADE
    assert premise_verdict([0.6, 0.7], [0.4, None], 0.8).startswith("n/a")


def test_a_cell_prints_mean_range_and_sd():
    assert cell([0.1, 0.2, 0.3]) == "0.200 (0.100–0.300, sd 0.100)"
    assert cell([None, 0.5]) == "0.500"
    assert cell([None]) == "n/a"


# ---- the task and the environment -----------------------------------------------------------


def test_chains_stay_below_1000_and_avoid_excluded_openings():
    rng = np.random.default_rng(0)
    held = task.sample_chains(50, 6, rng)
    assert len(task.openings(held)) == 50  # distinct openings
    train = task.sample_chains(500, 3, rng, exclude=task.openings(held), distinct=False)
    assert not task.openings(train) & task.openings(held)
    assert all(c.totals()[-1] < 1000 for c in held + train)


def test_a_turn_is_graded_against_the_models_own_previous_answer():
    env = ChainEnv(turns=3)
    opening = env.reset({"start": 100, "addends": [20, 30, 40]})
    assert opening == [{"role": "user", "content": "100+20"}]
    obs = env.step(_turn(task.scratchpad(100, 21)))  # wrote 121: wrong (120)
    assert obs.messages == [{"role": "user", "content": "+30"}] and not obs.done
    env.step(_turn("1+0=1|2+3=5|1+0=1|151"))  # its own 121 + 30: right
    obs = env.step(_turn("190"))  # 151 + 40 = 191: wrong
    assert env.turn_correct == [False, True, False]
    assert obs.done and obs.reward == pytest.approx(1 / 3)


def test_a_turn_without_a_number_hands_on_the_true_total():
    env = ChainEnv(turns=3)
    env.reset({"start": 100, "addends": [20, 30, 40]})
    env.step(_turn("||"))
    env.step(_turn("150"))  # the true 120 + 30
    assert env.turn_correct == [False, True]


def test_a_truncated_turn_ends_the_episode_and_unplayed_turns_count_wrong():
    env = ChainEnv(turns=3)
    env.reset({"start": 100, "addends": [20, 30, 40]})
    obs = env.step(AssistantTurn("120", [], True))
    assert obs.done and obs.reward == pytest.approx(1 / 3)


def test_the_answer_is_the_last_integer():
    assert answer_of(task.scratchpad(347, 85)) == 432
    assert answer_of("|") is None
    assert answer_of("1.5") is None
