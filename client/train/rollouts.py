"""On-policy rollouts: the student samples, then records what it thought at every position.

Notation: the field names and shape suffixes of opd.client.train.positions (T = this rollout's
completion length, K = student top-k, k = teacher top-k); arrays are per rollout.

A rollout engine (opd.client.train.engines: `hf` or `vllm`) samples the completion ids, all
prompts of a call in one batch, at temperature / top-p with no top-k cut, so a model's own
generation defaults never change the policy. A completion ends at the first EOS, which is kept
and scored: whether to stop is a decision the teacher should judge too. The rollout-time
("old") values the objectives and diagnostics use (log p of the sampled tokens, the top-K
candidate ids with their full-vocabulary log-probs, the entropy) always come from the
trainer's own weights (opd.client.train.student_math), whatever engine sampled: in training
the engine's top-K ids are the candidates and the loss pass records the numbers (the
one-forward step, `statistics=False`); elsewhere (probe, evaluation, `--candidates trainer`)
one teacher-forced pass records them all right after sampling.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from opd.client.train.engines import RolloutEngine, Sample, draw_seeds
from opd.client.train.horizon import UNBOUNDED, Horizon, HorizonCounts, count_cut
from opd.client.train.student_math import StudentModule, position_stats
from opd.modeling.eos import eos_ids
from opd.shared.packed import positions_of_spans
from opd.shared.schemas import GenerateOptions


@dataclass
class Rollout:
    prompt_index: int
    token_ids: np.ndarray  # prompt + completion, int64 [P + T]
    prompt_len: int
    truncated: bool  # hit max_new_tokens without EOS
    # The student's numbers (opd.client.train.positions). student_topk_ids_TK are the
    # candidate ids the teacher scores; the other three are None between sampling and the
    # loss pass of a one-forward step (they are filled from the loss pass: docs/training.md).
    student_token_logp_T: np.ndarray | None
    student_topk_ids_TK: np.ndarray
    student_topk_logp_TK: np.ndarray | None
    student_entropy_T: np.ndarray | None
    # from the teacher service; None until scored, or when the request did not ask for it
    teacher_token_logp_T: np.ndarray | None = None
    teacher_cand_logp_TK: np.ndarray | None = None
    teacher_topk_ids_Tk: np.ndarray | None = None
    teacher_topk_logp_Tk: np.ndarray | None = None
    teacher_entropy_T: np.ndarray | None = None
    # the rollout engine's own log p of the sampled tokens (a check that it samples the
    # trainer's weights); None for engines that do not report them
    engine_token_logp_T: np.ndarray | None = None
    # An episode's trained spans: int64 [S, 2] half-open [start, end) ranges of token_ids, one
    # per assistant turn, the student's own sampled tokens. None: one span [prompt_len, L), a
    # single completion. Tokens outside the spans (tool results, user turns) are context.
    spans: np.ndarray | None = None
    # What the episode's environment said (roles between turns, reward); None outside episodes
    episode: EpisodeInfo | None = None
    # A teacher of another tokenizer (opd.client.train.cross_tokenizer): the aligned chunk of
    # every trained position (numbered over the rollout), and whether that chunk is one token
    # on both sides. None: the teacher shares the student's tokenizer.
    chunk_T: np.ndarray | None = None
    one_to_one_T: np.ndarray | None = None

    @property
    def scored_spans(self) -> np.ndarray:
        """The trained spans, int64 [S, 2] (one [prompt_len, L) span for a single completion)."""
        if self.spans is None:
            return np.array([[self.prompt_len, len(self.token_ids)]], dtype=np.int64)
        return self.spans

    @property
    def positions(self) -> np.ndarray:
        """Absolute indices into token_ids of the trained positions, in order (the T rows)."""
        return positions_of_spans(self.scored_spans)

    @property
    def turn_T(self) -> np.ndarray:
        """Turn index (0 = the first assistant turn) of every trained position (turns the
        teacher wrote are counted: they are not trained, so no position has their index)."""
        spans = self.scored_spans
        turns = self.episode.span_turns if self.episode is not None else None
        index = np.arange(len(spans)) if turns is None else np.asarray(turns)
        return np.repeat(index.astype(np.int64), spans[:, 1] - spans[:, 0])

    @property
    def depth_T(self) -> np.ndarray:
        """Absolute token depth of every trained position: tokens since the first assistant
        token, context included (so depth grows through tool results and user turns too)."""
        return self.positions - self.prompt_len

    @property
    def completion_len(self) -> int:
        """Trained positions (the T of the per-position arrays)."""
        spans = self.scored_spans
        return int((spans[:, 1] - spans[:, 0]).sum())

    @property
    def completion(self) -> np.ndarray:
        """The student's sampled ids at the trained positions."""
        if self.spans is None:
            return self.token_ids[self.prompt_len :]
        return self.token_ids[self.positions]


@dataclass
class EpisodeInfo:
    """What a multi-turn episode adds to its Rollout (opd.client.train.episodes).

    context_roles[j]: the roles of the messages appended after assistant turn j ("tool",
    "user", ...; empty after the last turn). reward: the environment's, None if it gives none.
    ended: why the episode stopped ("done": the environment ended it; "max_turns",
    "turn_tokens" (a turn hit --max-new-tokens), "episode_tokens" (--max-episode-tokens)).
    turn_correct: per-turn grades where the environment keeps them (else empty).
    span_turns: the turn index of each trained span (None: span j is turn j, as when the
    student wrote every turn). teacher_spans: [start, end) of the turns the teacher wrote
    (re-anchoring, opd.client.train.reanchor): context, or off-policy targets, never trained
    as student samples."""

    context_roles: list[list[str]]
    reward: float | None
    ended: str
    turn_correct: list[bool] = field(default_factory=list)
    span_turns: list[int] | None = None
    teacher_spans: list[tuple[int, int]] = field(default_factory=list)
    # The conversation as text, for another tokenizer's template (a cross-tokenizer teacher,
    # or coldstart re-rendering a teacher's episode for the student): the opening messages as
    # the environment gave them, the same with the tool instructions in the system message
    # (TurnRenderer.text_opening: what another template is given), and the environment's
    # messages after each assistant turn. Not saved with the rollouts.
    opening: list[dict] = field(default_factory=list)
    opening_text: list[dict] = field(default_factory=list)
    context_messages: list[list[dict]] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return self.ended != "done"

    def conversation(self, turns: int) -> list[dict]:
        """The opening, then per student turn (the first `turns`: a horizon may have cut the
        rest) an assistant message without content and the environment's messages after it,
        none after the last (opd.client.train.cross_tokenizer fills the turns in)."""
        if self.teacher_spans:
            raise ValueError("a re-anchored episode cannot be rendered for another tokenizer")
        out = [dict(m) for m in self.opening_text]
        for j, after in enumerate(self.context_messages[:turns]):
            out.append({"role": "assistant"})
            if j + 1 < turns:
                out.extend(dict(m) for m in after)
        return out


@dataclass(frozen=True)
class SamplingParams:
    """How an engine samples for one model: the wire's sampling options (n, temperature,
    top-p, max tokens: the one sampling class, GenerateOptions, as /v1/generate takes them) and
    the ids that end and pad this model's completions."""

    options: GenerateOptions
    eos_token_ids: tuple[int, ...]  # any of them ends a completion (opd.modeling.eos)
    pad_token_id: int
    # K > 0: the engine also returns its top-K ids at every sampled position (Sample.topk_ids_TK)
    top_ids: int = 0

    def with_n(self, n: int) -> SamplingParams:
        return replace(self, options=self.options.model_copy(update={"n": n}))

    def with_top_ids(self, k: int) -> SamplingParams:
        return replace(self, top_ids=k)

    @classmethod
    def for_tokenizer(
        cls, tokenizer, options: GenerateOptions, generation_config: object | None = None
    ) -> SamplingParams:
        """The tokenizer's EOS and the generation config's end a completion, as on the
        teacher's side (opd.modeling.eos); padding falls back to the tokenizer's EOS."""
        eos = eos_ids(tokenizer, generation_config)
        pad = tokenizer.pad_token_id
        pad = int(pad if pad is not None else tokenizer.eos_token_id)
        return cls(options, tuple(sorted(eos)), pad)


def make_rollouts(
    engine: RolloutEngine,
    student: StudentModule,
    prompts: Sequence[tuple[int, list[int]]],
    params: SamplingParams,
    top_k: int,
    seeds: list[int] | None = None,
) -> list[Rollout]:
    """Sample params.n completions of every (prompt index, prompt ids) in one engine call, then
    record the student's rollout-time statistics with the trainer's own forward."""
    seeds = draw_seeds(len(prompts)) if seeds is None else seeds
    samples = engine.sample([ids for _, ids in prompts], params, seeds)
    return with_statistics(student, list(zip(prompts, samples, strict=True)), top_k)


def with_statistics(
    student: StudentModule,
    sampled: Sequence[tuple[tuple[int, list[int]], list[Sample]]],
    top_k: int,
    statistics: bool = True,
) -> list[Rollout]:
    """Rollouts of sampled completions, with the student's numbers at every position from one
    teacher-forced pass of the student (opd.client.train.student_math.position_stats); with
    `statistics` False, only the engine's top-K ids as candidates (sampler_candidates)."""
    entries = [
        (index, np.asarray(ids, np.int64), s) for (index, ids), group in sampled for s in group
    ]
    seqs = [np.concatenate([ids, s.completion_ids]) for _, ids, s in entries]
    if statistics:
        stats = position_stats(student, seqs, [len(ids) for _, ids, _ in entries], top_k)
    else:
        stats = [
            sampler_candidates(s.topk_ids_TK, len(s.completion_ids), top_k) for *_, s in entries
        ]
    return [
        Rollout(index, seq, len(ids), s.truncated, **st, engine_token_logp_T=s.engine_logp_T)
        for (index, ids, s), seq, st in zip(entries, seqs, stats, strict=True)
    ]


def sampler_candidates(top_ids_TK: np.ndarray | None, length: int, top_k: int) -> dict:
    """A rollout's student fields before its loss pass (the one-forward step): the engine's
    top-K ids as the candidates the teacher scores, the rest to be filled by the loss pass."""
    if top_ids_TK is None:
        if length:
            raise RuntimeError("the rollout engine returned no top-K ids (SamplingParams.top_ids)")
        top_ids_TK = np.zeros((0, top_k), dtype=np.int64)
    if top_ids_TK.shape != (length, top_k):
        raise RuntimeError(
            f"engine top-K ids of shape {top_ids_TK.shape}, expected {(length, top_k)}"
        )
    return {
        "student_token_logp_T": None,
        "student_topk_ids_TK": np.asarray(top_ids_TK, dtype=np.int64),
        "student_topk_logp_TK": None,
        "student_entropy_T": None,
    }


def last_turn_text(tokenizer: Any, token_ids: np.ndarray, spans: np.ndarray) -> str:
    """The text of the last trained span (an episode's last assistant turn, a completion's
    whole answer), special tokens removed: what a verifier grades as the final answer."""
    a, b = (int(x) for x in spans[-1])
    return tokenizer.decode(np.asarray(token_ids[a:b]).tolist(), skip_special_tokens=True)


class StepSampler:
    """A `sample(chunk)` for opd.client.train.pipeline.collect that samples *all* `prompts` in
    one engine call (on the first chunk: the engine's throughput comes from the batch), then
    computes the statistics chunk by chunk, so the teacher scores chunk c while the trainer's
    forward runs on chunk c + 1. Chunks must come in the order of `prompts`.

    engine_s / stats_s: seconds in the engine and in the statistics pass (the step's split).
    With `statistics` False (the one-forward training step) there is no statistics pass: the
    engine returns its top-K ids as the candidates, and the loss pass fills in the rest.
    Samples are cut to `horizon` (opd.client.train.horizon) before the statistics pass, so
    nothing past it is scored or trained; `counts` holds the positions before and after.
    Seeds are drawn at construction, one per prompt, from torch's global RNG. Subclasses
    (opd.client.train.episodes.EpisodeSampler) change what one prompt's sampling produces
    (`_sample_all`) and how it becomes rollouts (`_rollouts`)."""

    def __init__(
        self,
        engine: RolloutEngine,
        student: StudentModule,
        prompts: Sequence[tuple[int, Any]],
        params: SamplingParams,
        top_k: int,
        horizon: Horizon = UNBOUNDED,
        statistics: bool = True,
    ) -> None:
        self.engine, self.student, self.top_k = engine, student, top_k
        # without the statistics pass the engine hands out the candidate ids
        self.params = params if statistics else params.with_top_ids(top_k)
        self.horizon, self.statistics = horizon, statistics
        self.counts = HorizonCounts()  # positions sampled and kept within the horizon
        self.prompts = list(prompts)
        self.seeds = draw_seeds(len(self.prompts))
        self.pending: list[tuple[tuple[int, Any], Any]] | None = None
        self.engine_s = 0.0
        self.stats_s = 0.0

    def __call__(self, chunk: Sequence[int]) -> list[Rollout]:
        if self.pending is None:
            t0 = time.perf_counter()
            self.pending = list(zip(self.prompts, self._sample_all(), strict=True))
            self.engine_s += time.perf_counter() - t0
        mine, self.pending = self.pending[: len(chunk)], self.pending[len(chunk) :]
        if [index for (index, _), _ in mine] != list(chunk):
            raise RuntimeError("StepSampler: chunks must come in the order of its prompts")
        mine = [(p, count_cut(group, self.horizon, self.counts)) for p, group in mine]
        t0 = time.perf_counter()
        rollouts = self._rollouts(mine)
        self.stats_s += time.perf_counter() - t0
        return rollouts

    def _sample_all(self) -> list[Any]:
        """params.n samples of every prompt (prompt ids), in one engine call."""
        return self.engine.sample([ids for _, ids in self.prompts], self.params, self.seeds)

    def _rollouts(self, sampled: list[tuple[tuple[int, Any], Any]]) -> list[Rollout]:
        return with_statistics(self.student, sampled, self.top_k, self.statistics)


def chunk_sampler(
    engine: RolloutEngine,
    student: StudentModule,
    prompt_ids: Callable[[int], list[int]],
    params: SamplingParams,
    top_k: int,
) -> Callable[[Sequence[int]], list[Rollout]]:
    """A `sample(chunk)` that samples each chunk of prompt indices in one engine call (for
    prompt sets too large for one call: opd probe, opd select-prompts); the teacher scores
    chunk c while the engine samples chunk c + 1."""

    def sample(chunk: Sequence[int]) -> list[Rollout]:
        prompts = [(i, prompt_ids(i)) for i in chunk]
        return StepSampler(engine, student, prompts, params, top_k)(chunk)

    return sample


def chunked(items: Sequence[int], parts: int = 4) -> list[list[int]]:
    """`items` in about `parts` consecutive chunks (the pipeline's overlap unit)."""
    size = max(1, -(-len(items) // parts))
    return [list(items[a : a + size]) for a in range(0, len(items), size)]
