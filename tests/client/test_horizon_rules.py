"""opd.client.train.horizon on hand-made diagnostics: no model, no server.

The horizon decides which positions the teacher scores and the student trains, so its rules
are checked where the right answer is known by construction: the `--horizon` forms and their
refusals; the fade rule (faded_from, recommend) on per-position signals with a fade at a known
depth, a single dip, or none; the adaptive controller over many seeded noisy steps (noise does
not move the horizon, a fade is found at its depth, warmup, growth, min_tokens, checkpoint
state); the cuts of samples and episodes (spans, ids, engine log-probs, turns, teacher-written
turns) and their counts; the per-position overlap the rule reads, against a brute-force set
intersection; and the re-anchoring schedule and draw (opd.client.train.reanchor).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from opd.client.configs.groups import HorizonGroup, ReanchorGroup, parse_horizon
from opd.client.train.diagnostics import compute_diagnostics, overlap_ratio, position_depths
from opd.client.train.engines import Sample
from opd.client.train.episodes import Episode
from opd.client.train.horizon import (
    UNBOUNDED,
    AdaptiveHorizon,
    Horizon,
    HorizonControl,
    HorizonCounts,
    bucket_sums,
    count_cut,
    cut,
    cut_episode,
    cut_sample,
    faded_from,
    recommend,
    trained_count,
)
from opd.client.train.positions import PositionStats
from opd.client.train.reanchor import probability, teacher_writes
from opd.client.train.rollouts import EpisodeInfo

# ---------------------------------------------------------------------------------------------
# --horizon: the forms and the refusals


@pytest.mark.parametrize(
    ("rule", "parsed"),
    [
        ("none", ("none", None, None)),
        ("adaptive", ("adaptive", None, None)),
        ("fixed:512", ("fixed", 512, None)),
        ("fixed:1", ("fixed", 1, None)),
        ("fixed:3turns", ("fixed", None, 3)),
    ],
)
def test_parse_horizon_accepts_the_documented_forms(rule, parsed):
    assert parse_horizon(rule) == parsed
    group = HorizonGroup(rule=rule)
    assert group.rule == rule
    assert group.parsed() == parsed


def test_horizon_group_defaults_to_none():
    assert HorizonGroup().parsed() == ("none", None, None)


@pytest.mark.parametrize(
    "rule", ["fixed:0", "fixed:x", "fixed", "3", "fixed:-1turns", "adaptiv", "fixed:turns", ""]
)
def test_bad_horizon_rules_are_refused_naming_the_forms(rule):
    with pytest.raises(ValidationError) as info:
        HorizonGroup(rule=rule)
    message = str(info.value)
    assert "horizon" in message
    for form in ("none", "fixed:N", "fixed:Nturns", "adaptive"):
        assert form in message
    assert repr(rule) in message
    with pytest.raises(ValueError, match="horizon"):
        parse_horizon(rule)


def test_a_superscript_digit_is_refused_naming_the_forms():
    with pytest.raises(ValidationError, match="fixed:Nturns"):
        HorizonGroup(rule="fixed:\u00b2")


# ---------------------------------------------------------------------------------------------
# faded_from and recommend: one batch's rule


def test_faded_from_reads_the_trailing_faded_run():
    assert faded_from({0: 0.7, 1: 0.7, 2: 0.2, 3: 0.2}, 0.8) == 2
    # unknown buckets are skipped, not treated as faded or live
    assert faded_from({0: 0.7, 1: 0.7, 3: 0.2, 5: 0.1}, 0.8) == 3
    # a dip with a live bucket after it does not cut; a later trailing run still does
    assert faded_from({0: 0.7, 1: 0.2, 2: 0.7, 3: 0.2, 4: 0.2}, 0.8) == 3
    assert faded_from({0: 0.7, 1: 0.7, 2: 0.2, 3: 0.7}, 0.8) is None
    # the threshold is strict: exactly fade x bucket 0 is not faded
    assert faded_from({0: 1.0, 1: 0.8}, 0.8) is None
    assert faded_from({0: 1.0, 1: 0.79}, 0.8) == 1


def test_faded_from_needs_bucket_zero():
    assert faded_from({1: 0.2, 2: 0.2}, 0.8) is None
    assert faded_from({0: float("nan"), 1: 0.2}, 0.8) is None
    assert faded_from({}, 0.8) is None
    assert faded_from({0: 0.7}, 0.8) is None


def _signal(rng, depth_N, mean_of_depth, sd=0.05):
    return mean_of_depth(depth_N) + rng.normal(0.0, sd, depth_N.shape)


BUCKET = 64
GROUP = HorizonGroup(
    rule="adaptive", bucket=BUCKET, fade=0.8, smoothing=0.3, warmup_steps=3, min_tokens=8
)


def _depths(n_sequences=4, length=1024):
    return np.tile(np.arange(length), n_sequences)


@pytest.mark.parametrize("fade_at", [BUCKET, 4 * BUCKET, 8 * BUCKET, 15 * BUCKET])
def test_recommend_finds_a_fade_at_a_known_depth(fade_at):
    rng = np.random.default_rng(fade_at)
    depth_N = _depths()
    signal_N = _signal(rng, depth_N, lambda d: np.where(d < fade_at, 0.7, 0.2))
    tokens, per_bucket = recommend(depth_N, signal_N, GROUP)
    assert tokens == fade_at
    assert sorted(per_bucket) == list(range(1024 // BUCKET))
    for b, value in per_bucket.items():
        assert value == pytest.approx(0.7 if b * BUCKET < fade_at else 0.2, abs=0.02)


def test_recommend_ignores_a_single_faded_bucket_with_live_buckets_after_it():
    rng = np.random.default_rng(1)
    depth_N = _depths()
    dip = (depth_N >= 5 * BUCKET) & (depth_N < 6 * BUCKET)
    signal_N = _signal(rng, depth_N, lambda d: np.where(dip, 0.2, 0.7))
    tokens, per_bucket = recommend(depth_N, signal_N, GROUP)
    assert per_bucket[5] == pytest.approx(0.2, abs=0.02)
    assert tokens is None


def test_recommend_without_a_fade_is_none():
    rng = np.random.default_rng(2)
    depth_N = _depths()
    signal_N = _signal(rng, depth_N, lambda d: np.full(d.shape, 0.7))
    assert recommend(depth_N, signal_N, GROUP)[0] is None
    # a slow drift that stays above fade x bucket 0 does not cut either
    signal_N = _signal(rng, depth_N, lambda d: 0.7 - 0.1 * d / 1024)
    assert recommend(depth_N, signal_N, GROUP)[0] is None


def test_recommend_with_bucket_zero_unknown_is_none():
    rng = np.random.default_rng(3)
    depth_N = _depths()
    depth_N = depth_N[depth_N >= BUCKET]  # no position in bucket 0
    signal_N = _signal(rng, depth_N, lambda d: np.where(d < 512, 0.7, 0.2))
    tokens, per_bucket = recommend(depth_N, signal_N, GROUP)
    assert 0 not in per_bucket
    assert tokens is None
    # too few positions in bucket 0 is the same as none
    few = np.concatenate([np.arange(GROUP.min_tokens - 1), depth_N])
    tokens, per_bucket = recommend(
        few, _signal(rng, few, lambda d: np.where(d < 512, 0.7, 0.2)), GROUP
    )
    assert 0 not in per_bucket
    assert tokens is None


def test_recommend_skips_sparse_buckets_and_nan_positions():
    rng = np.random.default_rng(4)
    depth_N = _depths(length=512)
    signal_N = _signal(rng, depth_N, lambda d: np.full(d.shape, 0.7))
    # a deepest bucket with fewer than min_tokens positions, all at 0: not read
    deep = np.full(GROUP.min_tokens - 1, 700)
    depth_N = np.concatenate([depth_N, deep])
    signal_N = np.concatenate([signal_N, np.zeros(deep.size)])
    # nan positions (undefined signal) count nowhere
    signal_N[depth_N == 100] = np.nan
    tokens, per_bucket = recommend(depth_N, signal_N, GROUP)
    assert 700 // BUCKET not in per_bucket
    assert tokens is None
    assert np.isfinite(list(per_bucket.values())).all()


def test_recommend_on_an_empty_batch_is_none():
    tokens, per_bucket = recommend(np.zeros(0, np.int64), np.zeros(0), GROUP)
    assert tokens is None
    assert per_bucket == {}


def test_bucket_sums_clamps_deep_positions_and_skips_nan():
    depth_N = np.array([0, 1, 2, 3, 4, 5, 100])
    signal_N = np.array([1.0, 2.0, np.nan, 4.0, 5.0, 6.0, 7.0])
    sums, counts = bucket_sums(depth_N, signal_N, bucket=2, n_buckets=3)
    np.testing.assert_allclose(sums, [3.0, 4.0, 18.0])
    np.testing.assert_allclose(counts, [2.0, 1.0, 3.0])


# ---------------------------------------------------------------------------------------------
# AdaptiveHorizon over many noisy steps

N_BUCKETS = 8
COUNT = 100.0  # positions per scored bucket per step
STEP_SD = 0.03  # step-to-step noise of a bucket's mean overlap


def _feed(control, means, rng, sd=STEP_SD):
    """One step as the trainer sees it: buckets at or past the current horizon are not scored
    (count 0); the others report their mean plus step noise. Returns the new bound in buckets."""
    bound = control.horizon.tokens
    scored = N_BUCKETS if bound is None else bound // control.group.bucket
    counts = np.where(np.arange(N_BUCKETS) < scored, COUNT, 0.0)
    x = np.asarray(means, dtype=np.float64) + rng.normal(0.0, sd, N_BUCKETS)
    control.observe(x * counts, counts)
    return control.buckets


def _fade(at, live=0.6, faded=0.25):
    return np.where(np.arange(N_BUCKETS) >= at, faded, live)


LIVE = np.full(N_BUCKETS, 0.6)


@pytest.mark.parametrize("seed", range(5))
def test_noise_does_not_move_the_horizon(seed):
    rng = np.random.default_rng(seed)
    control = AdaptiveHorizon(GROUP, n_buckets=N_BUCKETS)
    for _ in range(50):
        _feed(control, LIVE, rng)
        assert control.horizon == UNBOUNDED
        assert control.horizon.tokens is None
    assert control.steps == 50


@pytest.mark.parametrize(("seed", "at"), [(0, 4), (1, 4), (2, 2), (3, 6), (4, 1)])
def test_a_fade_at_a_known_depth_is_found(seed, at):
    """The cut lands at the fade's bucket start on the first step after warmup. From then on
    the rule probes one bucket deeper whenever nothing inside the bound is faded (the module's
    growth rule), and every probe that scores the faded bucket cuts back to exactly the same
    depth: the horizon never goes shallower, never deeper than one probe bucket, never back to
    unbounded."""
    rng = np.random.default_rng(seed)
    control = AdaptiveHorizon(GROUP, n_buckets=N_BUCKETS)
    means = _fade(at)
    for _ in range(GROUP.warmup_steps):
        _feed(control, means, rng)
        assert control.horizon == UNBOUNDED
    _feed(control, means, rng)
    assert control.horizon == Horizon(tokens=at * BUCKET)
    for _ in range(45):
        before = control.horizon.tokens
        _feed(control, means, rng)
        after = control.horizon.tokens
        assert after in (at * BUCKET, (at + 1) * BUCKET)
        if before is None or before > at * BUCKET:  # this step scored the faded bucket
            assert after == at * BUCKET


def test_warmup_steps_score_every_depth():
    rng = np.random.default_rng(5)
    group = GROUP.model_copy(update={"warmup_steps": 6})
    control = AdaptiveHorizon(group, n_buckets=N_BUCKETS)
    for _ in range(6):
        _feed(control, _fade(3), rng)
        assert control.horizon == UNBOUNDED
    _feed(control, _fade(3), rng)
    assert control.horizon.tokens == 3 * BUCKET
    # no warmup: the first step already cuts
    control = AdaptiveHorizon(GROUP.model_copy(update={"warmup_steps": 0}), n_buckets=N_BUCKETS)
    _feed(control, _fade(3), rng)
    assert control.horizon.tokens == 3 * BUCKET


def _cut_at_four(rng, group=GROUP):
    control = AdaptiveHorizon(group, n_buckets=N_BUCKETS)
    while control.steps < group.warmup_steps + 1 or control.buckets != 4:
        _feed(control, _fade(4), rng)
        assert control.steps < 50
    return control


def test_growth_probes_one_bucket_deeper_and_recovers_when_depth_comes_back():
    """After a cut, live signal within the bound makes the horizon grow; with the deeper
    buckets live again it ends unbounded and stays there."""
    rng = np.random.default_rng(6)
    control = _cut_at_four(rng)
    trace = [_feed(control, LIVE, rng) for _ in range(60)]
    # the bound holds regrow_steps steps, then probes one bucket deeper
    assert trace[: GROUP.regrow_steps] == [4] * GROUP.regrow_steps
    assert trace[GROUP.regrow_steps] == 5
    assert all(b is None or b >= 4 for b in trace)  # live buckets are never cut
    assert trace[-15:] == [None] * 15


def test_growth_is_one_bucket_per_step_when_depth_comes_back():
    """With regrow_steps 0, a regrown bucket is judged on fresh scores (its pre-cut average
    was forgotten), so live depth comes back one bucket per step."""
    rng = np.random.default_rng(6)
    control = _cut_at_four(rng, GROUP.model_copy(update={"regrow_steps": 0}))
    trace = [_feed(control, LIVE, rng) for _ in range(12)]
    assert trace == [5, 6, 7] + [None] * 9


def test_growth_needs_the_deepest_bucket_inside_the_bound_to_be_seen():
    rng = np.random.default_rng(7)
    control = _cut_at_four(rng)
    sums, counts = np.zeros(N_BUCKETS), np.zeros(N_BUCKETS)
    counts[:3] = COUNT
    sums[:3] = 0.6 * COUNT
    control.observe(sums, counts)  # bucket 3 (the bound's last) unseen: no probe
    assert control.buckets == 4


def test_a_bucket_below_min_tokens_does_not_update_its_average():
    group = GROUP.model_copy(update={"warmup_steps": 100})
    control = AdaptiveHorizon(group, n_buckets=4)
    few, enough = group.min_tokens - 1, group.min_tokens

    def step(value2, count2):
        counts = np.array([COUNT, COUNT, count2, COUNT])
        sums = np.array([0.6, 0.6, value2, 0.6]) * counts
        control.observe(sums, counts)

    step(0.0, few)
    assert 2 not in control.average
    step(0.5, enough)
    assert control.average[2] == pytest.approx(0.5)
    step(0.0, few)
    assert control.average[2] == pytest.approx(0.5)
    step(0.0, 0)
    assert control.average[2] == pytest.approx(0.5)
    step(0.3, enough)
    assert control.average[2] == pytest.approx(0.7 * 0.5 + 0.3 * 0.3)
    assert control.average[0] == pytest.approx(0.6)


def test_a_sparse_faded_bucket_does_not_cut():
    """The deepest bucket holds only a few positions, all with zero overlap: below min_tokens
    it is not read, so it cannot cut."""
    rng = np.random.default_rng(8)
    control = AdaptiveHorizon(GROUP, n_buckets=N_BUCKETS)
    for _ in range(20):
        counts = np.full(N_BUCKETS, COUNT)
        counts[-1] = GROUP.min_tokens - 1
        x = LIVE + rng.normal(0.0, STEP_SD, N_BUCKETS)
        x[-1] = 0.0
        control.observe(x * counts, counts)
        assert control.horizon == UNBOUNDED
    assert N_BUCKETS - 1 not in control.average


def test_state_round_trips_through_json_and_decides_the_same():
    rng = np.random.default_rng(9)
    a = AdaptiveHorizon(GROUP, n_buckets=N_BUCKETS)
    for _ in range(7):
        _feed(a, _fade(3), rng)
    assert a.horizon.bounded
    b = AdaptiveHorizon(GROUP, n_buckets=N_BUCKETS)
    b.load_state(json.loads(json.dumps(a.state())))
    assert (b.buckets, b.steps, b.average) == (a.buckets, a.steps, a.average)
    # the same steps from here (a fade that later lifts) give the same decisions
    for i in range(30):
        assert b.horizon == a.horizon
        means = _fade(3) if i < 10 else LIVE
        bound = a.horizon.tokens
        scored = N_BUCKETS if bound is None else bound // BUCKET
        counts = np.where(np.arange(N_BUCKETS) < scored, COUNT, 0.0)
        x = means + rng.normal(0.0, STEP_SD, N_BUCKETS)
        a.observe(x * counts, counts)
        b.observe(x * counts, counts)
    assert b.horizon == a.horizon
    assert b.state() == a.state()


def test_horizon_control_holds_the_rule():
    none = HorizonControl(HorizonGroup(), max_depth=1000)
    assert not none.active and none.horizon == UNBOUNDED and none.state() is None
    none.load_state({"average": {}, "buckets": 1, "steps": 1})  # ignored
    assert none.horizon == UNBOUNDED
    fixed = HorizonControl(HorizonGroup(rule="fixed:3turns"), max_depth=1000)
    assert fixed.active and fixed.horizon == Horizon(turns=3) and fixed.adaptive is None
    adaptive = HorizonControl(GROUP, max_depth=1000)
    assert adaptive.adaptive is not None
    assert adaptive.adaptive.n_buckets == -(-1000 // BUCKET)
    assert adaptive.horizon == UNBOUNDED


# ---------------------------------------------------------------------------------------------
# Cuts of samples and episodes


def test_cut_sample_keeps_the_first_tokens():
    ids = np.arange(100, 120, dtype=np.int64)
    logp = -np.arange(20, dtype=np.float64) / 10
    sample = Sample(ids, truncated=False, engine_logp_T=logp)
    out = cut_sample(sample, Horizon(tokens=8))
    np.testing.assert_array_equal(out.completion_ids, ids[:8])
    np.testing.assert_array_equal(out.engine_logp_T, logp[:8])
    assert out.truncated is False
    assert cut_sample(Sample(ids, truncated=True), Horizon(tokens=8)).engine_logp_T is None
    # within the horizon, unbounded, or a turns bound (a completion is one turn): unchanged
    assert cut_sample(sample, Horizon(tokens=20)) is sample
    assert cut_sample(sample, Horizon(tokens=500)) is sample
    assert cut_sample(sample, UNBOUNDED) is sample
    assert cut_sample(sample, Horizon(turns=1)) is sample
    assert cut(sample, Horizon(tokens=8)).completion_ids.size == 8


def _episode():
    """prompt [0, 5); span 1 [5, 10); context [10, 13); span 2 [13, 20); context [20, 22);
    span 3 [22, 26). Depth of position i: i - 5."""
    spans = np.array([[5, 10], [13, 20], [22, 26]], dtype=np.int64)
    return Episode(
        token_ids=np.arange(1000, 1026, dtype=np.int64),
        prompt_len=5,
        spans=spans,
        info=EpisodeInfo(context_roles=[["tool"], ["user"], []], reward=1.0, ended="done"),
        engine_logp_T=-np.arange(16, dtype=np.float64) / 10,
    )


def test_cut_episode_inside_a_span_keeps_a_partial_span():
    episode = _episode()
    out = cut_episode(episode, Horizon(tokens=11))  # depth < 11: positions < 16
    assert out.spans.tolist() == [[5, 10], [13, 16]]
    np.testing.assert_array_equal(out.token_ids, episode.token_ids[:16])
    np.testing.assert_array_equal(out.engine_logp_T, episode.engine_logp_T[:8])
    assert out.info.span_turns == [0, 1]
    assert out.info.teacher_spans == []
    assert (out.info.reward, out.info.ended) == (1.0, "done")
    assert out.prompt_len == 5
    assert trained_count(episode) == 16 and trained_count(out) == 8
    # the input is not modified
    assert episode.spans.tolist() == [[5, 10], [13, 20], [22, 26]]
    assert episode.info.span_turns is None


def test_cut_episode_inside_context_ends_at_the_last_span():
    out = cut_episode(_episode(), Horizon(tokens=16))  # positions < 21: inside the context
    assert out.spans.tolist() == [[5, 10], [13, 20]]
    assert out.token_ids.size == 20
    assert out.engine_logp_T.size == 12
    out = cut_episode(_episode(), Horizon(tokens=1))
    assert out.spans.tolist() == [[5, 6]]
    assert out.token_ids.size == 6 and out.engine_logp_T.size == 1


def test_cut_episode_by_turns():
    out = cut_episode(_episode(), Horizon(turns=2))
    assert out.spans.tolist() == [[5, 10], [13, 20]]
    assert out.token_ids.size == 20
    assert out.engine_logp_T.size == 12
    assert out.info.span_turns == [0, 1]
    out = cut_episode(_episode(), Horizon(turns=1))
    assert out.spans.tolist() == [[5, 10]]
    # both bounds: the tighter one wins
    assert cut_episode(_episode(), Horizon(tokens=3, turns=2)).spans.tolist() == [[5, 8]]
    assert cut_episode(_episode(), Horizon(tokens=100, turns=1)).spans.tolist() == [[5, 10]]


def test_cut_episode_beyond_the_episode_is_unchanged():
    episode = _episode()
    assert cut_episode(episode, Horizon(tokens=21)) is episode  # depth 20 is the last
    assert cut_episode(episode, Horizon(tokens=10_000)) is episode
    assert cut_episode(episode, Horizon(turns=3)) is episode
    assert cut_episode(episode, UNBOUNDED) is episode
    assert cut(episode, Horizon(turns=5)) is episode
    assert cut_episode(episode, Horizon(tokens=20)).spans.tolist() == [[5, 10], [13, 20], [22, 25]]


def _reanchored_episode():
    """Turns 0, 2, 4 by the student, 1 and 3 by the teacher: prompt [0, 4); turn 0 [4, 8);
    context [8, 10); turn 1 (teacher) [10, 14); context [14, 16); turn 2 [16, 22); context
    [22, 24); turn 3 (teacher) [24, 28); context [28, 30); turn 4 [30, 34)."""
    return Episode(
        token_ids=np.arange(34, dtype=np.int64),
        prompt_len=4,
        spans=np.array([[4, 8], [16, 22], [30, 34]], dtype=np.int64),
        info=EpisodeInfo(
            context_roles=[["tool"]] * 4 + [[]],
            reward=0.0,
            ended="done",
            span_turns=[0, 2, 4],
            teacher_spans=[(10, 14), (24, 28)],
        ),
        engine_logp_T=np.arange(14, dtype=np.float64),
    )


def test_cut_episode_keeps_every_turn_within_the_horizon_whoever_wrote_it():
    out = cut_episode(_reanchored_episode(), Horizon(tokens=15))  # positions < 19
    assert out.spans.tolist() == [[4, 8], [16, 19]]
    assert out.info.span_turns == [0, 2]
    assert out.info.teacher_spans == [(10, 14)]
    assert out.token_ids.size == 19
    np.testing.assert_array_equal(out.engine_logp_T, np.arange(7))

    out = cut_episode(_reanchored_episode(), Horizon(turns=3))  # turns 0, 1, 2
    assert out.spans.tolist() == [[4, 8], [16, 22]]
    assert out.info.span_turns == [0, 2]
    assert out.info.teacher_spans == [(10, 14)]
    assert out.token_ids.size == 22
    assert out.engine_logp_T.size == 10

    out = cut_episode(_reanchored_episode(), Horizon(turns=4))  # turns 0..3
    assert out.info.span_turns == [0, 2]
    assert out.info.teacher_spans == [(10, 14), (24, 28)]  # turn 3, the teacher's, is kept
    assert out.token_ids.size == 28  # (a target with --reanchor-as target)

    # every kept teacher span lies inside the kept ids, every kept span's turn is in bounds
    for horizon in [Horizon(tokens=t) for t in range(1, 31)] + [Horizon(turns=t) for t in (1, 5)]:
        out = cut_episode(_reanchored_episode(), horizon)
        assert len(out.info.span_turns) == len(out.spans)
        assert all(b <= out.token_ids.size for _, b in out.info.teacher_spans)
        assert out.engine_logp_T.size == trained_count(out)
        ends = [int(out.spans[-1, 1])] + [b for _, b in out.info.teacher_spans]
        assert max(ends) == out.token_ids.size
        if horizon.tokens is not None:
            assert (out.spans - out.prompt_len).max() <= horizon.tokens


def test_horizon_counts_and_metrics():
    sample = Sample(np.arange(20, dtype=np.int64), truncated=False)
    counts = HorizonCounts()
    kept = count_cut([sample, _episode()], Horizon(tokens=11), counts)
    assert [trained_count(k) for k in kept] == [11, 8]
    assert (counts.sampled, counts.kept) == (36, 19)
    metrics = counts.metrics(Horizon(tokens=11))
    assert metrics == {
        "horizon/cut_frac": pytest.approx(17 / 36),
        "horizon/positions_cut": 17.0,
        "horizon/positions_kept": 19.0,
        "horizon/tokens": 11.0,
    }
    turns = HorizonCounts()
    count_cut([sample, _episode()], Horizon(turns=2), turns)
    metrics = turns.metrics(Horizon(turns=2))
    assert "horizon/tokens" not in metrics
    assert metrics["horizon/turns"] == 2.0
    assert metrics["horizon/positions_cut"] == 4.0
    assert HorizonCounts().metrics(UNBOUNDED) == {
        "horizon/cut_frac": 0.0,
        "horizon/positions_cut": 0.0,
        "horizon/positions_kept": 0.0,
    }


# ---------------------------------------------------------------------------------------------
# The signal: overlap_ratio and position_depths


def _random_stats(rng, n_positions, K, k, vocab=30):
    """Distributions over `vocab` ids; each side's top set is stored in a shuffled column
    order (so only the log-probs say which ids are the top ones)."""
    logp_NV = np.log(rng.dirichlet(np.ones(vocab), n_positions))
    logq_NV = np.log(rng.dirichlet(np.ones(vocab), n_positions))
    rows = np.arange(n_positions)[:, None]
    s_ids = np.argsort(-logp_NV, axis=1)[:, :K]
    t_ids = np.argsort(-logq_NV, axis=1)[:, :k]
    s_ids = np.take_along_axis(
        s_ids, rng.permuted(np.tile(np.arange(K), (n_positions, 1)), axis=1), 1
    )
    t_ids = np.take_along_axis(
        t_ids, rng.permuted(np.tile(np.arange(k), (n_positions, 1)), axis=1), 1
    )
    y_N = s_ids[:, 0]
    stats = PositionStats(
        student_topk_ids_NK=s_ids,
        student_topk_logp_NK=logp_NV[rows, s_ids],
        teacher_topk_ids_Nk=t_ids,
        teacher_topk_logp_Nk=logq_NV[rows, t_ids],
        teacher_cand_logp_NK=logq_NV[rows, s_ids],
        student_token_logp_N=logp_NV[np.arange(n_positions), y_N],
        teacher_token_logp_N=logq_NV[np.arange(n_positions), y_N],
        student_entropy_N=-(np.exp(logp_NV) * logp_NV).sum(axis=1),
        teacher_entropy_N=-(np.exp(logq_NV) * logq_NV).sum(axis=1),
        seq_offsets=np.array([0, n_positions // 2, n_positions], dtype=np.int64),
    )
    return stats.validate()


def _brute_overlap(stats):
    out = []
    s_ids, s_lp = stats.student_topk_ids_NK, stats.student_topk_logp_NK
    t_ids, t_lp = stats.teacher_topk_ids_Nk, stats.teacher_topk_logp_Nk
    m = min(s_ids.shape[1], t_ids.shape[1])
    for t in range(stats.n_positions):
        s = sorted(zip(s_lp[t], s_ids[t], strict=True), reverse=True)[:m]
        q = sorted(zip(t_lp[t], t_ids[t], strict=True), reverse=True)[:m]
        out.append(len({i for _, i in s} & {i for _, i in q}) / m)
    return np.array(out)


@pytest.mark.parametrize(("K", "k"), [(4, 4), (6, 3), (3, 7), (1, 5)])
def test_overlap_ratio_is_the_equal_size_top_set_intersection(K, k):
    rng = np.random.default_rng(K * 10 + k)
    stats = _random_stats(rng, n_positions=40, K=K, k=k, vocab=12)
    ratio = overlap_ratio(stats)
    np.testing.assert_allclose(ratio, _brute_overlap(stats))
    assert compute_diagnostics(stats, depth_bucket=None)["overlap/ratio"] == pytest.approx(
        float(ratio.mean())
    )


def test_overlap_ratio_equal_size_cut_on_a_hand_made_position():
    """K = 4, k = 2: the student's id 7 is in the teacher's top set but is the student's 4th
    candidate, so the equal-size (2) cut leaves it out: 1 shared id of 2, not 2."""
    stats = PositionStats(
        student_topk_ids_NK=[[7, 3, 5, 9]],
        student_topk_logp_NK=np.log([[0.05, 0.5, 0.3, 0.1]]),
        teacher_topk_ids_Nk=[[3, 7]],
        teacher_topk_logp_Nk=np.log([[0.6, 0.3]]),
        teacher_cand_logp_NK=np.log([[0.3, 0.6, 0.01, 0.01]]),
        student_token_logp_N=np.log([0.5]),
        teacher_token_logp_N=np.log([0.6]),
        student_entropy_N=[1.0],
        teacher_entropy_N=[1.0],
        seq_offsets=[0, 1],
    ).validate()
    np.testing.assert_allclose(overlap_ratio(stats), [0.5])
    np.testing.assert_allclose(_brute_overlap(stats), [0.5])
    assert compute_diagnostics(stats, depth_bucket=None)["overlap/ratio"] == pytest.approx(0.5)


def test_overlap_ratio_needs_the_teacher_top_set():
    stats = _random_stats(np.random.default_rng(0), n_positions=4, K=3, k=3)
    stats.teacher_topk_ids_Nk = None
    with pytest.raises(ValueError, match="teacher_topk_ids_Nk"):
        overlap_ratio(stats)


def test_position_depths_and_step_sums():
    stats = _random_stats(np.random.default_rng(1), n_positions=10, K=3, k=3)
    np.testing.assert_array_equal(position_depths(stats), [0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    stats.depth_N = np.array([0, 1, 2, 5, 6, 0, 1, 4, 5, 9], dtype=np.int64)
    np.testing.assert_array_equal(position_depths(stats), stats.depth_N)
    group = HorizonGroup(rule="adaptive", bucket=4, min_tokens=1)
    control = HorizonControl(group, max_depth=12)
    sums, counts = control.step_sums(stats)
    ratio = overlap_ratio(stats)
    np.testing.assert_allclose(counts, [5, 4, 1])
    expected = [ratio[[0, 1, 2, 5, 6]].sum(), ratio[[3, 4, 7, 8]].sum(), ratio[9]]
    np.testing.assert_allclose(sums, expected)


# ---------------------------------------------------------------------------------------------
# Re-anchoring: the schedule and the draw


def test_reanchor_probability_decays_linearly_to_zero():
    group = ReanchorGroup(prob=0.6, decay_steps=100)
    assert probability(group, 0, max_steps=1000) == pytest.approx(0.6)
    assert probability(group, 25, max_steps=1000) == pytest.approx(0.45)
    assert probability(group, 50, max_steps=1000) == pytest.approx(0.3)
    assert probability(group, 100, max_steps=1000) == 0.0
    values = [probability(group, s, max_steps=1000) for s in range(0, 300)]
    assert min(values) == 0.0
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    steps = np.arange(0, 101)
    np.testing.assert_allclose(values[:101], 0.6 * (1 - steps / 100), atol=1e-12)
    # decay_steps None: over max_steps
    default = ReanchorGroup(prob=0.5)
    assert probability(default, 0, max_steps=40) == pytest.approx(0.5)
    assert probability(default, 10, max_steps=40) == pytest.approx(0.375)
    assert probability(default, 40, max_steps=40) == 0.0
    assert probability(default, 80, max_steps=40) == 0.0
    assert probability(ReanchorGroup(), 0, max_steps=40) == 0.0


def test_teacher_writes_never_turn_zero_and_is_deterministic():
    assert not any(teacher_writes(seed, 0, 1.0) for seed in range(200))
    assert not any(teacher_writes(seed, 3, 0.0) for seed in range(200))
    assert all(teacher_writes(seed, 1, 1.0) for seed in range(200))
    for seed in (0, 1, 12345, 2**63 + 7, -5):
        for turn in (1, 2, 9):
            first = teacher_writes(seed, turn, 0.4)
            assert all(teacher_writes(seed, turn, 0.4) == first for _ in range(3))


@pytest.mark.parametrize(("prob", "turn"), [(0.1, 1), (0.3, 2), (0.5, 5), (0.9, 1)])
def test_teacher_writes_with_its_probability(prob, turn):
    draws = [teacher_writes(seed, turn, prob) for seed in range(4000)]
    assert abs(np.mean(draws) - prob) < 0.03
    # the draw for another turn of the same episodes is not the same draw
    other = [teacher_writes(seed, turn + 1, prob) for seed in range(4000)]
    assert draws != other
