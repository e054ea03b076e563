"""`opd probe`: will OPD work for this student and these teachers? Measured before any training.

The paper's two conditions (docs/method.md, "When OPD works"):
1. compatible thinking patterns: on the student's own rollouts the teacher puts its mass on the
   same tokens (high initial top-k overlap, overlap-token advantage near 0, small entropy gap);
2. the teacher adds something: its token log-probs differ from the student's (sampled reverse
   KL clearly above 0). A teacher equal to the student, or from the same pipeline, shows ~0.

The student samples its rollouts once; every teacher scores the same rollouts, so teachers are
compared on identical tokens. Diagnostics are the trainer's own
(opd.client.train.diagnostics), overall and by depth, and a plain-language verdict with the
numbers that decided it ranks the teachers.

With --answer-field the rollouts are graded too (opd.client.evaluation): the student's accuracy,
and per teacher the AUROC of its sequence mean reward against correctness; --depth adds the
teacher-continuation depth curve (opd.client.evaluation.depth).

Per teacher the probe also recommends a training horizon (`recommend_horizon`): the adaptive
rule of `opd train --horizon adaptive` (opd.client.train.horizon.recommend, the one rule, not a
copy) applied once to the scored rollouts' per-position top-k overlap by depth, so a pair whose
teacher signal fades with depth can be trained on a prefix (`--horizon fixed:N`) from the start.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from opd.client.configs.groups import HorizonGroup, HorizonKnobs
from opd.client.configs.probe import ProbeConfig
from opd.client.train.metric_log import finite_json
from opd.shared.config_cli import replayable

if TYPE_CHECKING:
    from opd.client.train.positions import PositionStats

logger = logging.getLogger(__name__)

PROBE_VERSION = 1

# Verdict thresholds. The paper's successful runs start at ~72% top-16 overlap and climb past
# 91%; its failing pairs start well below and stay flat. On the embedded pair (SmolLM2 and its
# 24-layer subset) OPD still made progress from 0.32 (docs/training.md), while 10-20 kept layers
# (0.02-0.14) did not move: hence "compatible" >= 0.5, "borderline" in [0.25, 0.5).
COMPATIBLE_OVERLAP = 0.5
BORDERLINE_OVERLAP = 0.25
# Sampled reverse KL (nats/token) below which the teacher is treated as the student's twin:
# student == teacher measured 0.0 here (same float32 kernels; other kernels differ by ~1e-4),
# the 30-layer SmolLM2 over its 24-layer student 4.4 (tests/client/test_probe.py).
NO_SIGNAL_KL = 0.02
# Entropy gap (nats) above which the verdict warns that the teacher's sharpness differs.
LARGE_ENTROPY_GAP = 1.0
# Overlap-token advantage below which the student is over-confident inside the shared set.
NEGATIVE_ADVANTAGE = -0.1

# Verdict classes, best first: the ranking sorts on this order, then on overlap. An incompatible
# teacher with a signal can be rescued (opd coldstart, opd select-prompts); a twin cannot.
_CLASSES = ("good", "borderline", "incompatible", "no-signal")

# Prompts per rollout-engine call: one batch for the engine, one request per teacher, and the
# teachers score chunk c while the student samples chunk c + 1.
_PROBE_CHUNK = 32

SUMMARY_KEYS = (
    "overlap/ratio",
    "overlap/token_advantage",
    "entropy/gap",
    "overlap/mass_student",
    "overlap/mass_teacher",
    "kl/sampled",
    "entropy/student",
    "entropy/teacher",
)


def verdict(metrics: dict[str, float]) -> dict[str, Any]:
    """Plain-language verdict on the two conditions, with the numbers that decided it."""
    overlap = metrics["overlap/ratio"]
    kl = metrics["kl/sampled"]
    adv = metrics.get("overlap/token_advantage", float("nan"))
    gap = metrics["entropy/gap"]
    reasons = []
    if overlap >= COMPATIBLE_OVERLAP:
        compat = "compatible"
        reasons.append(f"top-k overlap {overlap:.2f} >= {COMPATIBLE_OVERLAP}: compatible patterns")
    elif overlap >= BORDERLINE_OVERLAP:
        compat = "borderline"
        reasons.append(
            f"top-k overlap {overlap:.2f} in [{BORDERLINE_OVERLAP}, {COMPATIBLE_OVERLAP}): the "
            "teacher and student share only part of their top tokens"
        )
    else:
        compat = "incompatible"
        reasons.append(
            f"top-k overlap {overlap:.2f} < {BORDERLINE_OVERLAP}: the teacher's mass is elsewhere "
            "on the student's own rollouts"
        )
    if np.isfinite(adv) and adv < NEGATIVE_ADVANTAGE:
        reasons.append(
            f"overlap-token advantage {adv:.3f} < {NEGATIVE_ADVANTAGE}: the student is "
            "over-confident on tokens the teacher also ranks high"
        )
    if gap > LARGE_ENTROPY_GAP:
        reasons.append(f"entropy gap {gap:.2f} nats > {LARGE_ENTROPY_GAP}: sharpness differs")
    signal = kl >= NO_SIGNAL_KL
    if signal:
        reasons.append(f"sampled reverse KL {kl:.3f} >= {NO_SIGNAL_KL} nats/token: a real signal")
    else:
        reasons.append(
            f"sampled reverse KL {kl:.4f} < {NO_SIGNAL_KL} nats/token: the teacher scores the "
            "student's tokens as the student does (same model or same pipeline)"
        )
    if not signal:
        cls, label = "no-signal", "no signal: the teacher adds nothing the student lacks"
    elif compat == "compatible":
        cls, label = "good", "compatible thinking patterns and a real signal: OPD should work"
    elif compat == "borderline":
        cls = "borderline"
        label = (
            "borderline: a signal, but partly incompatible; expect slow progress, consider "
            "opd coldstart or opd select-prompts first"
        )
    else:
        cls = "incompatible"
        label = "incompatible thinking patterns: OPD is likely to fail; start with opd coldstart"
    return {
        "class": cls,
        "label": label,
        "compatible": compat == "compatible",
        "signal": bool(signal),
        "reasons": reasons,
    }


def rank_teachers(teachers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first: verdict class, then overlap (compatibility first, the paper's lesson: a
    stronger teacher with another style loses), then the signal size."""

    def key(t: dict[str, Any]) -> tuple[int, float, float]:
        if "error" in t:
            return (len(_CLASSES), 0.0, 0.0)
        m = t["metrics"]
        return (_CLASSES.index(t["verdict"]["class"]), -m["overlap/ratio"], -m["kl/sampled"])

    ordered = sorted(teachers, key=key)
    for rank, t in enumerate(ordered, 1):
        t["rank"] = rank
    return ordered


def recommend_horizon(stats: PositionStats, knobs: HorizonKnobs) -> dict[str, Any]:
    """The training horizon the adaptive rule recommends on these scored positions.

    Why here: the rule training would apply step by step (opd.client.train.horizon.recommend)
    read once on the probe's rollouts says, before any training, whether the teacher's signal
    fades with depth and from where, so `opd train --horizon fixed:N` can start at that depth.

    Returns `recommended` ("fixed:N", or None when no cut is needed or it cannot be judged),
    `tokens` (N or None), `status` ("fixed", "none" or "undetermined"), the knobs, each bucket's
    mean overlap keyed "lo-hi" (buckets with at least min_tokens positions only), `holds_to`
    (status "none": the depth the overlap was seen to hold to, the end of the deepest counted
    bucket), `display` (the table's cell) and `reason` (one plain sentence)."""
    from opd.client.train.diagnostics import overlap_by_depth
    from opd.client.train.horizon import recommend

    group = HorizonGroup(rule="adaptive", **knobs.model_dump())
    depth_N, overlap_N = overlap_by_depth(stats)
    tokens, signal = recommend(depth_N, overlap_N, group)
    bucket = group.bucket
    labels = {b: f"{b * bucket}-{(b + 1) * bucket - 1}" for b in signal}
    out: dict[str, Any] = {
        "recommended": None if tokens is None else f"fixed:{tokens}",
        "tokens": tokens,
        "bucket": bucket,
        "fade": group.fade,
        "min_tokens": group.min_tokens,
        "overlap_by_bucket": {labels[b]: float(signal[b]) for b in sorted(signal)},
        "holds_to": None,
    }
    rule = f"{group.fade:g} x its first-bucket value"
    first = (  # the rule's reference (a fixed:N or none verdict always has bucket 0)
        f"{labels[0]}: {signal[0]:.3f}, floor {group.fade * signal[0]:.3f}" if 0 in signal else ""
    )
    if tokens is not None:
        out.update(
            status="fixed",
            display=f"fixed:{tokens}",
            reason=f"overlap falls below {rule} from depth {tokens:,} on ({first})",
        )
    elif 0 not in signal or len(signal) < 2:
        out.update(
            status="undetermined",
            display="undetermined",
            reason=f"too few positions to judge: the rule needs {group.min_tokens} or more in "
            f"the first {bucket}-token depth bucket and in at least one deeper one; sample "
            "longer or more rollouts, or lower --horizon-bucket / --horizon-min-tokens",
        )
    else:
        deepest = max(signal)
        in_deepest = depth_N[depth_N // bucket == deepest]
        holds_to = int(in_deepest.max()) + 1
        out.update(
            status="none",
            holds_to=holds_to,
            display=f"none needed (to {holds_to:,})",
            reason=f"overlap holds to depth {holds_to:,}: its deepest bucket with "
            f"{group.min_tokens} positions or more ({labels[deepest]}: {signal[deepest]:.3f}) "
            f"is not below {rule} ({first})",
        )
    return out


def sample_prompt_indices(n_available: int, num_prompts: int, seed: int) -> list[int]:
    """A seeded random subset (all prompts if fewer are available), in a fixed order."""
    rng = np.random.default_rng(seed)
    take = min(num_prompts, n_available)
    return sorted(int(i) for i in rng.choice(n_available, size=take, replace=False))


def run_probe(config: ProbeConfig, log=print) -> dict[str, Any]:  # noqa: ANN001
    """Sample the student once, score with every teacher, write probe.json, return the report."""
    import torch

    from opd.client.evaluation.rewards import reward_auroc, student_outcome
    from opd.client.evaluation.sources import EngineSource
    from opd.client.train.bridge import ScoreSpec
    from opd.client.train.cross_tokenizer import CrossSetup, conversations
    from opd.client.train.diagnostics import compute_diagnostics
    from opd.client.train.episodes import EpisodeSampler, EpisodeSetup
    from opd.client.train.factory import build_student, connect
    from opd.client.train.pipeline import collect
    from opd.client.train.positions import PositionStats
    from opd.client.train.prompts import load_prompts
    from opd.client.train.rollout_store import RolloutWriter, decode_pieces
    from opd.client.train.rollouts import chunk_sampler
    from opd.client.train.student import chat_prompt_ids

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    built = build_student(config.student.model, config.student, seed=config.seed)
    tokenizer, student, engine = built.tokenizer, built.module, built.engine
    connected = None
    try:
        items = None
        if config.answer_field is not None:
            from opd.client.evaluation.data import load_eval_set
            from opd.client.evaluation.verifiers import load_verifier

            verifier = load_verifier(config.verifier)
            items = load_eval_set(config.prompts, config.prompt_field, config.answer_field)
            prompts = [it.prompt for it in items]
        else:
            prompts = load_prompts(config.prompts, config.prompt_field)
        episodes = EpisodeSetup.of(config.episodes, tokenizer)
        rows: list[dict] = []
        if episodes is not None:  # environments read whole rows (the same rows, same order)
            from opd.client.train.prompts import load_rows

            rows, _ = load_rows(config.prompts)
        domain_of = None
        if config.domain_field is not None:
            from opd.client.recipes.probe_domains import prompt_domains
            from opd.client.train.prompts import load_rows

            rows, where = load_rows(config.prompts)  # the same rows, in the same order, as prompts
            domain_of = prompt_domains(rows, config.domain_field, where)
        indices = sample_prompt_indices(len(prompts), config.num_prompts, config.seed)
        params = built.sampling(config.sampling)
        # The diagnostics read every teacher field.
        spec = ScoreSpec(top_k=config.teacher_top_k, candidates=True, entropy=True)
        labels = [t.name or t.urls[0] for t in config.teachers]
        connected = connect(
            [(t.name, t.urls) for t in config.teachers],
            config.connection,
            spec,
            config.student_top_k,
            fingerprint=built.fingerprint(),
            keep_going=True,
            log=log,
            cross=CrossSetup(
                config.connection.cross_tokenizer,
                tokenizer,
                conversations(rows if episodes is not None else prompts),
            ),
        )
        entries: list[dict[str, Any]] = []
        by_name: dict[str, dict[str, Any]] = {}
        live = iter(connected.teachers)
        for spec_t, label in zip(config.teachers, labels, strict=True):
            entry: dict[str, Any] = {"url": ",".join(spec_t.urls)}
            entries.append(entry)
            if label in connected.errors:
                entry.update(name=label, error=connected.errors[label])
                continue
            teacher = next(live)
            entry["name"] = teacher.name
            entry["model"] = teacher.info.model_dump(
                mode="json", include={"name", "revision", "backend"}
            )
            entry["cross_tokenizer"] = teacher.bridge.cross is not None
            by_name[teacher.name] = entry
        positions = 0
        out = Path(config.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        log(f"sampling {config.sampling.n} rollout(s) on {len(indices)} prompts")

        if episodes is not None:
            setup = episodes

            def sample(chunk: list[int]) -> list[Any]:
                pairs = [(i, rows[i]) for i in chunk]
                top_k = config.student_top_k
                return EpisodeSampler(engine, student, pairs, params, top_k, setup)(chunk)
        else:
            sample = chunk_sampler(
                engine,
                student,
                lambda index: chat_prompt_ids(tokenizer, prompts[index]),
                params,
                config.student_top_k,
            )
        chunks = [indices[a : a + _PROBE_CHUNK] for a in range(0, len(indices), _PROBE_CHUNK)]

        def progress(done: int) -> None:
            log(f"  {min(done * _PROBE_CHUNK, len(indices))}/{len(indices)} prompts sampled")

        got = collect(
            connected.teachers,
            chunks,
            sample,
            spec,
            keep_going=True,
            on_chunk=progress,
        )
        for name, error in got.errors.items():
            by_name[name]["error"] = error
            log(f"teacher {by_name[name]['url']}: failed while scoring ({error})")
        outcome = None
        if (items is not None or episodes is not None) and got.scored:
            first = next(iter(got.scored.values()))
            outcome = student_outcome(
                first, items, verifier if items is not None else None, tokenizer
            )
            log(f"student accuracy {outcome['summary']['mean_at_n']:.3f} on its rollouts")
        for position, (name, scored) in enumerate(got.scored.items()):
            if config.save_rollouts:  # the first teacher's in out_dir/rollouts, as opd train's
                folder = out if position == 0 else out / "teachers" / safe_name(name)
                RolloutWriter(folder, decode_pieces(tokenizer)).write(0, scored)
            stats = PositionStats.from_rollouts(scored)
            positions = stats.n_positions
            metrics = compute_diagnostics(stats, depth_bucket=config.depth_bucket)
            by_name[name]["metrics"] = metrics
            by_name[name]["verdict"] = verdict(metrics)
            by_name[name]["horizon"] = recommend_horizon(stats, config.horizon)
            if outcome is not None:
                by_name[name]["outcome"] = reward_auroc(scored, outcome["correct"])
        domains = None
        if domain_of is not None and got.scored:
            from opd.client.recipes.probe_domains import rank_by_domain

            domains = rank_by_domain(
                got.scored,
                domain_of,
                lambda stats: compute_diagnostics(stats, depth_bucket=config.depth_bucket),
                verdict,
                rank_teachers,
            )
        depth = None
        # The depth probe continues the student's exact ids on each teacher: a teacher of
        # another tokenizer cannot read them, so it is left out of that curve (said here).
        continuing = {
            name: by_name[name]["url"].split(",")
            for name in got.scored
            if not by_name[name].get("cross_tokenizer")
        }
        if config.depth.enabled and len(continuing) < len(got.scored):
            log("depth probe: teachers of another tokenizer are left out (it continues ids)")
        if config.depth.enabled and episodes is not None and got.scored:
            log(f"depth probe across turns: continuing up to {config.depth.rollouts} episodes")
            depth = run_depth_turns(
                config,
                next(iter(got.scored.values())),
                rows,
                items,
                verifier if items is not None else None,
                engine,
                tokenizer,
                episodes,
                continuing,
            )
        elif config.depth.enabled and outcome is not None and got.scored:
            log(f"depth probe: continuing up to {config.depth.rollouts} rollouts")
            depth = run_depth(
                config,
                next(iter(got.scored.values())),
                items,
                verifier,
                EngineSource(engine, tokenizer),
                tokenizer,
                continuing,
            )
    finally:
        built.close()
        if connected is not None:
            connected.close()
    report = {
        "version": PROBE_VERSION,
        "student": config.student.model,
        "prompts": len(indices),
        "rollouts_per_prompt": config.sampling.n,
        "positions": positions,
        "prompt_indices": indices,
        "seconds": round(time.perf_counter() - started, 1),
        "thresholds": {
            "compatible_overlap": COMPATIBLE_OVERLAP,
            "borderline_overlap": BORDERLINE_OVERLAP,
            "no_signal_kl": NO_SIGNAL_KL,
            "large_entropy_gap": LARGE_ENTROPY_GAP,
            "negative_advantage": NEGATIVE_ADVANTAGE,
        },
        "config": replayable(config),
        "teachers": rank_teachers(entries),
    }
    if outcome is not None:
        report["student_outcome"] = outcome["summary"]
    if domains is not None:
        from opd.client.recipes.probe_domains import suggest_routing

        assert config.domain_field is not None
        report["domains"] = domains
        report["suggested_routing"] = suggest_routing(domains, config.domain_field)
    if depth is not None:
        report["depth_probe"] = depth
    (out / "probe.json").write_text(json.dumps(finite_json(report), indent=1))
    return report


def safe_name(name: str) -> str:
    """A display name (a teacher's, a source's) as one safe path component."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "teacher"


def run_depth(
    config: ProbeConfig,
    rollouts: list[Any],
    items: list[Any],
    verifier: Any,
    student: Any,
    tokenizer: Any,
    teacher_urls: dict[str, list[str]],
) -> dict[str, Any]:
    """The depth probe: every live teacher and the student continue the same prefixes."""
    from opd.client.evaluation.depth import probe_depth
    from opd.client.evaluation.sources import TeacherSource

    depth, options = config.depth, continuation_sampling(config)
    api_key = config.connection.api_key
    teachers = {name: TeacherSource.connect(urls, api_key) for name, urls in teacher_urls.items()}
    try:
        return probe_depth(
            rollouts,
            [items[r.prompt_index].answer for r in rollouts],
            student,
            teachers,
            verifier,
            options.options(seed=config.seed),
            depth.prefixes,
            depth.rollouts,
            tokenizer,
        )
    finally:
        for t in teachers.values():
            t.close()


def continuation_sampling(config: ProbeConfig) -> Any:
    """How the depth probe's continuations sample: --depth-samples each, at --depth-temperature
    (default: the rollouts' temperature), otherwise as the rollouts."""
    depth, sampling = config.depth, config.sampling
    temperature = sampling.temperature if depth.temperature is None else depth.temperature
    return sampling.model_copy(update={"n": depth.samples, "temperature": temperature})


def run_depth_turns(
    config: ProbeConfig,
    rollouts: list[Any],
    rows: list[dict],
    items: list[Any] | None,
    verifier: Any,
    engine: Any,
    tokenizer: Any,
    setup: Any,
    teacher_urls: dict[str, list[str]],
) -> dict[str, Any]:
    """The depth probe across turns (--env): every live teacher (through /v1/generate on the
    episode's ids) and the student continue the same episodes from the same turns."""
    from opd.client.evaluation.depth import probe_depth_turns
    from opd.client.evaluation.episode_source import TeacherEngine
    from opd.client.teacher import TeacherClient
    from opd.client.train.rollouts import SamplingParams

    depth = config.depth
    params = SamplingParams.for_tokenizer(tokenizer, continuation_sampling(config).options())
    grade = episode_grader(items, verifier, tokenizer)
    clients = {
        name: TeacherClient(urls, api_key=config.connection.api_key)
        for name, urls in teacher_urls.items()
    }
    try:
        return probe_depth_turns(
            rollouts,
            [rows[r.prompt_index] for r in rollouts],
            engine,
            {name: TeacherEngine(client) for name, client in clients.items()},
            setup,
            params,
            depth.prefixes,
            depth.rollouts,
            config.seed,
            grade,
        )
    finally:
        for client in clients.values():
            client.close()


def episode_grader(items: list[Any] | None, verifier: Any, tokenizer: Any):
    """grade(rollout, episode): the environment's reward, else 1.0 / 0.0 by the verifier on the
    episode's last assistant turn against the rollout's gold answer (needs --answer-field)."""
    from opd.client.train.rollouts import last_turn_text

    def grade(rollout: Any, episode: Any) -> float:
        if episode.info.reward is not None:
            return float(episode.info.reward)
        if items is None:
            raise ValueError(
                "depth: this environment gives no reward; give --answer-field to grade episodes"
            )
        text = last_turn_text(tokenizer, episode.token_ids, episode.spans)
        return float(verifier(text, items[rollout.prompt_index].answer).correct)

    return grade


def turn_rows(metrics: dict[str, float]) -> list[tuple[int, dict[str, float]]]:
    """(turn index, {key: value}) of the per-turn diagnostics (`<key>@turn{j}`), by turn."""
    by_turn: dict[int, dict[str, float]] = {}
    for key, value in metrics.items():
        base, sep, label = key.rpartition("@turn")
        if sep and label.isdigit():
            by_turn.setdefault(int(label), {})[base] = value
    return sorted(by_turn.items())


def depth_rows(metrics: dict[str, float], key: str) -> list[tuple[str, float]]:
    """(bucket label, value) of `key` by depth, in depth order."""
    prefix = key + "@depth"
    rows = [(k[len(prefix) :], v) for k, v in metrics.items() if k.startswith(prefix)]
    return sorted(rows, key=lambda kv: int(kv[0].split("-")[0]))
