"""Score rollouts on the teacher in the background while the student keeps generating.

The trainer's loop is synchronous (torch); the teacher client is asyncio. `TeacherBridge` runs
an AsyncTeacherClient on its own event-loop thread: `submit(rollouts)` returns at once with a
concurrent Future, so scoring of finished rollouts overlaps with sampling the next ones, and
teacher time hides behind student time. Each request's wall time is recorded so the trainer
can report teacher time and the part of it the student had to wait for.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from opd.client.teacher.client import AsyncTeacherClient
from opd.client.train.rollouts import Rollout
from opd.shared.packed import PackedRequest, PackedResult
from opd.shared.schemas import ModelInfo, ScoreOptions, TokenizerFiles

if TYPE_CHECKING:
    from opd.client.train.cross_tokenizer import CrossTokenizer


@dataclass(frozen=True)
class ScoreSpec:
    """What a score request asks the teacher for, beyond log q of the sampled tokens.

    top_k:      the teacher's own top-k per position (0: none).
    candidates: log q at the student's top-K ids (`student_topk_ids_TK` as candidate ids).
    entropy:    the teacher's full-vocabulary entropy per position.
    """

    top_k: int = 0
    candidates: bool = False
    entropy: bool = False


def rollouts_request(rollouts: list[Rollout], spec: ScoreSpec) -> PackedRequest:
    """The score request for rollouts: the prompt as context, the completion scored; an
    episode's assistant turns as scored spans (protocol 1.3), its tool results and user turns
    context only, so the teacher's rows are exactly the student's trained positions."""
    spans = None
    if any(r.spans is not None for r in rollouts):
        spans = [[(int(a), int(b)) for a, b in r.scored_spans] for r in rollouts]
    return PackedRequest.from_arrays(
        [r.token_ids for r in rollouts],
        [int(r.scored_spans[0, 0]) for r in rollouts],
        [r.student_topk_ids_TK for r in rollouts] if spec.candidates else None,
        ScoreOptions(top_k=spec.top_k, entropy=spec.entropy),
        spans=spans,
    )


def _f32(x: np.ndarray | None) -> np.ndarray | None:
    return None if x is None else np.asarray(x, np.float32)


def attach_scores(rollouts: list[Rollout], result: PackedResult) -> None:
    """The teacher's numbers onto their rollouts (fields not asked for stay None)."""
    for rollout, scores in zip(rollouts, result.sequences(), strict=True):
        rollout.teacher_token_logp_T = _f32(scores.token_logprobs)
        rollout.teacher_cand_logp_TK = _f32(scores.candidate_logprobs)
        rollout.teacher_topk_ids_Tk = scores.top_k_ids
        rollout.teacher_topk_logp_Tk = _f32(scores.top_k_logprobs)
        rollout.teacher_entropy_T = _f32(scores.entropy)


class TeacherBridge:
    """One teacher's connection on its own event loop. For a teacher of another tokenizer,
    `cross` (set after connecting) renders, aligns and translates each request
    (opd.client.train.cross_tokenizer); `align_s` sums the time that takes."""

    def __init__(self, urls: list[str] | str, **client_kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._client: AsyncTeacherClient = self._call(self._make_client(urls, client_kwargs))
        self.busy_s = 0.0  # summed wall time of teacher requests
        self.cross: CrossTokenizer | None = None
        self.align_s = 0.0

    async def _make_client(
        self, urls: list[str] | str, kwargs: dict[str, Any]
    ) -> AsyncTeacherClient:
        return AsyncTeacherClient(urls, **kwargs)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def connect(self) -> ModelInfo:
        return self._call(self._client.connect())

    def tokenizer(self) -> TokenizerFiles:
        """The teacher's tokenizer files (GET /v1/tokenizer)."""
        return self._call(self._client.tokenizer())

    def submit(self, rollouts: list[Rollout], spec: ScoreSpec) -> Future:
        """Start scoring; the future resolves (to the rollouts, now scored) when done."""
        cross, views = self.cross, None
        if cross is None:
            request = rollouts_request(rollouts, spec)
        else:
            started = time.perf_counter()
            options = ScoreOptions(top_k=spec.top_k, entropy=spec.entropy)
            request, views = cross.request(rollouts, options, spec.candidates)
            self.align_s += time.perf_counter() - started

        async def run() -> list[Rollout]:
            started = time.perf_counter()
            result = await self._client.score(request)
            self.busy_s += time.perf_counter() - started
            if cross is None:
                attach_scores(rollouts, result)
            else:
                t0 = time.perf_counter()
                cross.attach(rollouts, views, result, spec.top_k)
                self.align_s += time.perf_counter() - t0
            return rollouts

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    def close(self) -> None:
        self._call(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
