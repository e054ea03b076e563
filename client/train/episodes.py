"""Multi-turn episodes: the student's turns sampled in batches, the environment's answers
appended as tokens, one Rollout per episode with its assistant turns as trained spans.

    opd train --env calculator --prompts task:addition:train --max-turns 4 ...

One step runs every episode of its prompts (params.n per prompt) turn by turn: turn j of all
live episodes is one engine call (opd.client.train.engines, hf or vllm), then each episode's
environment (opd.client.episodes) reads the parsed assistant message and answers with tool
results / a user turn, or ends the episode. Token-in, token-out: an episode's ids are its
opening prompt, then exactly the ids the student sampled, then the renderer's ids of the
environment's messages (opd.client.episodes.render.TurnRenderer.observation_ids), and so on.
Earlier turns are never re-rendered through the chat template (templates are not
prefix-stable), so the sequence the teacher scores is the one the student conditioned on.

Trained positions are the student's sampled ids, its end-of-turn token included (the spans of
Rollout); tool results and user turns are context for both models (protocol 1.3 score_spans).
With re-anchoring (opd.client.train.reanchor) the teacher writes some turns: they are context
(or off-policy targets), never trained spans. --horizon (opd.client.train.horizon) cuts what
is trained after the episodes ran.

Limits (opd.client.configs.groups.EpisodeGroup), each ending the episode as truncated:
- a turn that hits --max-new-tokens without an end-of-turn token ("turn_tokens"): the
  environment still sees it (AssistantTurn.truncated, so it can grade it), then the episode
  ends whatever it answers;
- --max-turns assistant turns without the environment ending it ("max_turns");
- --max-episode-tokens after the opening prompt ("episode_tokens"): a turn that crosses the
  budget is cut at it; an observation that would leave no room for one more token ends it.
An environment that raises stops the step with an EpisodeError naming the episode and turn:
a step is never silently trained on fewer episodes than it sampled.

Seeds: each episode has its own (drawn from torch's global RNG, so resume replays it); turn j
samples with a seed derived from it and j, so an episode's turns do not depend on how the
engine batched the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from opd.client.episodes import Environment, EpisodeError, TurnRenderer, load_environment
from opd.client.train.engines import RolloutEngine
from opd.client.train.horizon import UNBOUNDED, Horizon
from opd.client.train.reanchor import Reanchoring, teacher_writes
from opd.client.train.rollouts import (
    EpisodeInfo,
    Rollout,
    SamplingParams,
    StepSampler,
    sampler_candidates,
)
from opd.client.train.student_math import position_stats
from opd.shared.packed import positions_of_spans

if TYPE_CHECKING:
    from opd.client.configs.groups import EpisodeGroup
    from opd.client.train.student_math import StudentModule

# odd 64-bit constant (the golden ratio's), mixing the turn index into an episode's seed
_TURN_MIX = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class EpisodeLimits:
    """The caps an episode runs under (turn tokens are the sampling params' max_tokens)."""

    max_turns: int
    max_episode_tokens: int


@dataclass
class Episode:
    """One finished episode: its ids, opening prompt length, trained spans, what the engine
    said about the sampled ids, and what the environment said (EpisodeInfo)."""

    token_ids: np.ndarray  # int64 [L]
    prompt_len: int
    spans: np.ndarray  # int64 [S, 2], one per assistant turn
    info: EpisodeInfo
    engine_logp_T: np.ndarray | None  # over the trained positions, None if not reported
    # the engine's top-K ids at the trained positions (SamplingParams.top_ids), else None
    topk_ids_TK: np.ndarray | None = None

    @property
    def truncated(self) -> bool:
        return self.info.truncated


@dataclass
class _Live:
    """An episode while it runs."""

    number: int  # in the step, for error messages
    env: Environment
    renderer: TurnRenderer
    ids: list[int]
    prompt_len: int
    seed: int
    # re-anchoring: the teacher that may write this episode's turns, and how likely it is
    teacher: RolloutEngine | None = None
    prob: float = 0.0
    spans: list[tuple[int, int]] = field(default_factory=list)
    span_turns: list[int] = field(default_factory=list)
    teacher_spans: list[tuple[int, int]] = field(default_factory=list)
    roles: list[list[str]] = field(default_factory=list)
    # the conversation as text, for a teacher of another tokenizer: the opening messages (as
    # the environment gave them, and with the tool instructions in the system message) and,
    # after each assistant turn, the environment's messages
    opening: list[dict] = field(default_factory=list)
    opening_text: list[dict] = field(default_factory=list)
    messages: list[list[dict]] = field(default_factory=list)
    logps: list[np.ndarray | None] = field(default_factory=list)
    top_ids: list[np.ndarray | None] = field(default_factory=list)
    ended: str | None = None
    reward: float | None = None

    @property
    def turns(self) -> int:
        """Assistant turns so far, whoever wrote them."""
        return len(self.spans) + len(self.teacher_spans)

    def writer(self, student: RolloutEngine) -> RolloutEngine:
        """Who writes the next turn: the teacher with probability `prob` (re-anchoring)."""
        if self.teacher is not None and teacher_writes(self.seed, self.turns, self.prob):
            return self.teacher
        return student

    def end(self, why: str, reward: float | None = None) -> None:
        self.ended, self.reward = why, reward
        self.roles.append([])
        self.messages.append([])

    def observed(self, messages: list[dict]) -> None:
        """The environment's messages after a turn (their ids are appended by the caller)."""
        self.roles.append([str(m.get("role", "")) for m in messages])
        self.messages.append([dict(m) for m in messages])

    def finished(self) -> Episode:
        logps = None if any(x is None for x in self.logps) else np.concatenate(self.logps)
        top = None
        if self.top_ids and all(x is not None for x in self.top_ids):
            top = np.concatenate(self.top_ids)  # type: ignore[arg-type]
        return Episode(
            token_ids=np.asarray(self.ids, dtype=np.int64),
            prompt_len=self.prompt_len,
            spans=np.asarray(self.spans, dtype=np.int64).reshape(-1, 2),
            info=EpisodeInfo(
                context_roles=self.roles,
                reward=self.reward,
                ended=self.ended or "done",
                turn_correct=list(getattr(self.env, "turn_correct", []) or []),
                span_turns=list(self.span_turns) if self.teacher_spans else None,
                teacher_spans=list(self.teacher_spans),
                opening=self.opening,
                opening_text=self.opening_text,
                context_messages=self.messages,
            ),
            engine_logp_T=logps,
            topk_ids_TK=top,
        )


def turn_seed(seed: int, turn: int) -> int:
    """The seed of an episode's turn: fixed by the episode's seed and the turn index."""
    return (seed + turn * _TURN_MIX) % 2**62


class Renderers:
    """One TurnRenderer per tool set (environments of one class share theirs), built once."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._by_tools: dict[tuple[str, ...], TurnRenderer] = {}

    def __call__(self, env: Environment) -> TurnRenderer:
        tools = list(getattr(env, "tools", None) or [])
        key = tuple(getattr(t, "__qualname__", repr(t)) for t in tools)
        if key not in self._by_tools:
            self._by_tools[key] = TurnRenderer(self.tokenizer, tools=tools)
        return self._by_tools[key]


def run_episodes(
    engine: RolloutEngine,
    renderers: Renderers,
    make_env: Callable[[], Environment],
    rows: Sequence[dict],
    params: SamplingParams,
    limits: EpisodeLimits,
    seeds: Sequence[int],
    reanchor: Reanchoring | None = None,
) -> list[list[Episode]]:
    """params.n episodes of every row, turn by turn, all live episodes of a turn in one engine
    call; returned grouped per row, in row order. seeds: one per row (episode r of a row
    uses seed + r). With `reanchor`, row i's teacher engine may write turns from the second
    on (opd.client.train.reanchor)."""
    n = params.options.n
    live: list[_Live] = []
    for i, (row, seed) in enumerate(zip(rows, seeds, strict=True)):
        for r in range(n):
            e = _open(renderers, make_env, row, len(live), (seed + r) % 2**62)
            if reanchor is not None and reanchor.prob > 0:
                e.teacher, e.prob = reanchor.engines[i], reanchor.prob
            live.append(e)
    play(engine, live, params, limits)
    finished = [e.finished() for e in live]
    return [finished[i * n : (i + 1) * n] for i in range(len(rows))]


def _open(
    renderers: Renderers, make_env: Callable[[], Environment], row: dict, number: int, seed: int
) -> _Live:
    """A new episode of `row`: its environment reset, its opening prompt rendered."""
    env = make_env()
    opening = _call(env, "reset", number, 0, lambda: env.reset(row))
    renderer = renderers(env)
    ids = list(renderer.opening_ids(opening))
    live = _Live(number, env, renderer, ids, len(ids), seed)
    live.opening = [dict(m) for m in opening]
    live.opening_text = renderer.text_opening(opening)
    return live


def play(
    engine: RolloutEngine, live: Sequence[_Live], params: SamplingParams, limits: EpisodeLimits
) -> None:
    """Run live episodes to their end: each round, one engine call samples the next turn of
    every episode still running (one completion each; any end-of-turn token ends a turn), and
    one call per teacher writes the turns re-anchoring gave it."""
    if not live:
        return
    stops = tuple(sorted(set(params.eos_token_ids) | set(live[0].renderer.end_of_turn_ids)))
    one = replace(params.with_n(1), eos_token_ids=stops)
    while active := [e for e in live if e.ended is None]:
        by_writer: dict[int, tuple[RolloutEngine, list[_Live]]] = {id(engine): (engine, [])}
        for e in active:
            writer = e.writer(engine)
            by_writer.setdefault(id(writer), (writer, []))[1].append(e)
        for writer, group in by_writer.values():
            if not group:
                continue
            seeds = [turn_seed(e.seed, e.turns) for e in group]
            samples = writer.sample([e.ids for e in group], one, seeds)
            for e, (sample,) in zip(group, samples, strict=True):
                _take_turn(e, sample, e.turns, limits, by_teacher=writer is not engine)


def continue_episodes(
    engine: RolloutEngine,
    renderers: Renderers,
    make_env: Callable[[], Environment],
    starts: Sequence[tuple[dict, Rollout, int]],
    params: SamplingParams,
    limits: EpisodeLimits,
    seed: int,
) -> list[list[Episode]]:
    """params.n continuations of recorded episodes from a turn: for each (row, rollout, j) the
    environment is replayed through the rollout's first j turns (their exact ids), then
    `engine` plays on from turn j. Grouped per start; continuation r of start i samples with
    seed + i * n + r. The teacher-continuation depth probe across turns (opd probe --depth)."""
    n = params.options.n
    live: list[_Live] = []
    for row, rollout, turn in starts:
        for _ in range(n):
            number = len(live)
            live.append(_replay(renderers, make_env, row, rollout, turn, number, seed + number))
    play(engine, live, params, limits)
    finished = [e.finished() for e in live]
    return [finished[i * n : (i + 1) * n] for i in range(len(starts))]


def _replay(
    renderers: Renderers,
    make_env: Callable[[], Environment],
    row: dict,
    rollout: Rollout,
    turn: int,
    number: int,
    seed: int,
) -> _Live:
    """The episode of `rollout` as it stood before its turn `turn`: the environment stepped
    with the recorded turns. The environment must answer as it did: its observations are
    checked against the recorded ids (an EpisodeError names the first difference)."""
    e = _open(renderers, make_env, row, number, seed)
    ids = rollout.token_ids
    if e.ids != ids[: rollout.prompt_len].tolist():
        raise EpisodeError(
            f"{type(e.env).__name__}.reset", number, 0, ValueError("replayed opening differs")
        )
    spans = rollout.scored_spans
    for j in range(turn):
        a, b = (int(x) for x in spans[j])
        e.ids.extend(ids[a:b].tolist())
        e.spans.append((a, b))
        e.span_turns.append(j)
        e.logps.append(None)
        e.top_ids.append(None)
        message = e.renderer.parse(ids[a:b].tolist(), truncated=False)
        obs = _call(e.env, "step", number, j + 1, lambda m=message: e.env.step(m))
        more = e.renderer.observation_ids(obs.messages)
        nxt = int(spans[j + 1, 0]) if j + 1 < len(spans) else len(ids)
        if obs.done or more != ids[b:nxt].tolist():
            raise EpisodeError(
                f"{type(e.env).__name__}.step",
                number,
                j + 1,
                ValueError("the replayed observation differs from the recorded one"),
            )
        e.ids.extend(more)
        e.observed(obs.messages)
    return e


def _take_turn(
    e: _Live, sample: Any, turn: int, limits: EpisodeLimits, by_teacher: bool = False
) -> None:
    """Append a sampled turn to its episode (a trained span, or a teacher-written one), then
    the environment's answer (or end it)."""
    budget = limits.max_episode_tokens - (len(e.ids) - e.prompt_len)
    ids = np.asarray(sample.completion_ids, dtype=np.int64)
    logp, top = sample.engine_logp_T, sample.topk_ids_TK
    cut = len(ids) > budget
    if cut:
        ids = ids[:budget]
        logp = None if logp is None else logp[:budget]
        top = None if top is None else top[:budget]
    start = len(e.ids)
    e.ids.extend(int(t) for t in ids)
    if by_teacher:
        e.teacher_spans.append((start, len(e.ids)))
    else:
        e.spans.append((start, len(e.ids)))
        e.span_turns.append(turn)
        e.logps.append(logp)
        e.top_ids.append(top)
    truncated = cut or bool(sample.truncated)
    message = e.renderer.parse(ids.tolist(), truncated=truncated)
    # A cut turn is still shown to the environment (it may grade it, e.g. as wrong), but
    # nothing can follow it: it has no end-of-turn token.
    obs = _call(e.env, "step", e.number, turn + 1, lambda: e.env.step(message))
    if truncated:
        return e.end("episode_tokens" if cut else "turn_tokens", obs.reward)
    if obs.done:
        return e.end("done", obs.reward)
    if turn + 1 >= limits.max_turns:
        return e.end("max_turns", obs.reward)
    more = e.renderer.observation_ids(obs.messages)
    if len(e.ids) + len(more) - e.prompt_len >= limits.max_episode_tokens:
        return e.end("episode_tokens", obs.reward)
    e.ids.extend(int(t) for t in more)
    e.observed(obs.messages)
    return None


def _call(env: Environment, what: str, episode: int, turn: int, fn: Callable[[], Any]) -> Any:
    """Run an environment method; anything it raises becomes an EpisodeError naming where."""
    try:
        return fn()
    except EpisodeError:
        raise
    except Exception as exc:
        raise EpisodeError(f"{type(env).__name__}.{what}", episode, turn, exc) from exc


def episode_rollouts(
    student: StudentModule,
    sampled: Sequence[tuple[tuple[int, dict], list[Episode]]],
    top_k: int,
    statistics: bool = True,
) -> list[Rollout]:
    """Rollouts of finished episodes, with the student's numbers at every trained position
    from one teacher-forced pass (opd.client.train.student_math.position_stats), or without
    `statistics` the engine's top-K ids only (rollouts.sampler_candidates)."""
    entries = [(index, ep) for (index, _), group in sampled for ep in group]
    positions = [positions_of_spans(ep.spans) for _, ep in entries]
    if statistics:
        stats = position_stats(student, [ep.token_ids for _, ep in entries], positions, top_k)
    else:
        stats = [
            sampler_candidates(ep.topk_ids_TK, len(p), top_k)
            for (_, ep), p in zip(entries, positions, strict=True)
        ]
    return [
        Rollout(
            index,
            ep.token_ids,
            ep.prompt_len,
            ep.truncated,
            **st,
            engine_token_logp_T=ep.engine_logp_T,
            spans=ep.spans,
            episode=ep.info,
        )
        for (index, ep), st in zip(entries, stats, strict=True)
    ]


class EpisodeSampler(StepSampler):
    """StepSampler over episodes: `prompts` are (prompt index, data row) pairs; the first chunk
    runs every episode of the step (engine_s includes the environments' time), then each chunk's
    statistics are computed while the teacher scores the one before."""

    def __init__(
        self,
        engine: RolloutEngine,
        student: StudentModule,
        rows: Sequence[tuple[int, dict]],
        params: SamplingParams,
        top_k: int,
        setup: EpisodeSetup,
        horizon: Horizon = UNBOUNDED,
        reanchor: Reanchoring | None = None,
        statistics: bool = True,
    ) -> None:
        super().__init__(engine, student, rows, params, top_k, horizon, statistics)
        self.setup, self.reanchor = setup, reanchor

    def _sample_all(self) -> list[Any]:
        rows = [row for _, row in self.prompts]
        return self.setup.run(self.engine, rows, self.params, self.seeds, self.reanchor)

    def _rollouts(self, sampled: list[tuple[tuple[int, Any], Any]]) -> list[Rollout]:
        return episode_rollouts(self.student, sampled, self.top_k, self.statistics)


@dataclass(frozen=True)
class EpisodeSetup:
    """What a command with --env needs to run episodes: the environment factory, the
    renderers over the student's tokenizer, the limits."""

    make_env: Callable[[], Environment]
    renderers: Renderers
    limits: EpisodeLimits

    @classmethod
    def of(cls, group: EpisodeGroup, tokenizer: Any) -> EpisodeSetup | None:
        """None without --env (single completions)."""
        if group.env is None:
            return None
        return cls(
            load_environment(group.env, group.kwargs()),
            Renderers(tokenizer),
            EpisodeLimits(group.max_turns, group.max_episode_tokens),
        )

    def run(
        self,
        engine: RolloutEngine,
        rows: Sequence[dict],
        params: SamplingParams,
        seeds: list[int],
        reanchor: Reanchoring | None = None,
    ) -> list[list[Episode]]:
        """Episodes of rows (without statistics: evaluation and teacher episodes call it
        directly, the EpisodeSampler adds them)."""
        return run_episodes(
            engine, self.renderers, self.make_env, rows, params, self.limits, seeds, reanchor
        )

    def continue_from(
        self,
        engine: RolloutEngine,
        starts: Sequence[tuple[dict, Rollout, int]],
        params: SamplingParams,
        seed: int,
    ) -> list[list[Episode]]:
        """Recorded episodes continued from a turn (continue_episodes)."""
        return continue_episodes(
            engine, self.renderers, self.make_env, starts, params, self.limits, seed
        )


def episode_metrics(rollouts: Sequence[Rollout]) -> dict[str, float]:
    """Per-step episode figures: turns, length, how episodes ended, reward (where given)."""
    eps = [r.episode for r in rollouts if r.episode is not None]
    if not eps:
        return {}
    turns = [len(r.scored_spans) + len(r.episode.teacher_spans) for r in rollouts if r.episode]
    out = {
        "episode/turns_mean": float(np.mean(turns)),
        "episode/turns_max": float(np.max(turns)),
        "episode/tokens_mean": float(
            np.mean([len(r.token_ids) - r.prompt_len for r in rollouts if r.episode])
        ),
        "episode/truncated_frac": float(np.mean([e.truncated for e in eps])),
    }
    for why in ("max_turns", "turn_tokens", "episode_tokens"):
        out[f"episode/ended_{why}_frac"] = float(np.mean([e.ended == why for e in eps]))
    rewards = [e.reward for e in eps if e.reward is not None]
    if rewards:
        out["episode/reward_mean"] = float(np.mean(rewards))
    return out
