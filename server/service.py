"""The scoring service: decode, validate, batch, encode. Testable without HTTP.

Routes (opd.server.routes, opd.server.dropin) are glue around this class: they read the body,
call `score` (the drop-in ones build a request, `check` it and `score_packed` it) and send the
bytes back. The service owns the backend and the batcher for the app's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from opd.modeling.eos import Generated
from opd.modeling.tokenizer_files import tokenizer_files
from opd.server.backends.base import Backend, ScoreItem
from opd.server.batcher import Batcher, QueueFull
from opd.server.metrics import Metrics
from opd.server.settings import Settings
from opd.shared.chat import chat_prompt_ids
from opd.shared.codec import (
    decode_request_json,
    decode_request_msgpack,
    encode_result_msgpack,
    json_object,
    result_to_json_dict,
    validate_wire,
)
from opd.shared.errors import ContractError
from opd.shared.limits import Limits
from opd.shared.packed import PackedRequest, PackedResult
from opd.shared.schemas import (
    GeneratedCompletion,
    GenerateRequest,
    GenerateResponse,
    GenerateResult,
    GenerateUsage,
    ModelInfo,
    ScoreOptions,
    TokenizerFiles,
)
from opd.shared.validation import validate_generate, validate_request
from opd.shared.version import JSON_MEDIA_TYPE, MSGPACK_MEDIA_TYPE

logger = logging.getLogger(__name__)


def wants_msgpack(media: str | None) -> bool:
    return bool(media) and MSGPACK_MEDIA_TYPE in media.lower()  # type: ignore[union-attr]


def request_encoding(content_type: str | None) -> str:
    """'msgpack' or 'json' from Content-Type; anything else is a 415."""
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct == MSGPACK_MEDIA_TYPE:
        return "msgpack"
    if ct in ("", JSON_MEDIA_TYPE):
        return "json"
    raise ContractError(
        f"Content-Type {ct!r} is not supported; use {JSON_MEDIA_TYPE} or {MSGPACK_MEDIA_TYPE}",
        field="Content-Type",
        status=415,
        kind="unsupported_media_type",
    )


def response_encoding(accept: str | None, request_enc: str) -> str:
    """msgpack if Accept names it, json if Accept names JSON, else mirror the request."""
    if wants_msgpack(accept):
        return "msgpack"
    if accept and JSON_MEDIA_TYPE in accept.lower():
        return "json"
    return request_enc


@dataclass
class Encoded:
    body: bytes | dict
    media_type: str
    scored_tokens: int
    input_tokens: int


class ScoringService:
    def __init__(
        self,
        settings: Settings,
        backend_factory: Callable[[Settings], Backend],
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._backend_factory = backend_factory
        self.backend: Backend | None = None
        self.info: ModelInfo | None = None  # what GET /v1/model says, from the backend
        self._tokenizer_json: bytes | None = None  # GET /v1/tokenizer's answer, once built
        self.limits: Limits = settings.effective_limits()
        self.batcher: Batcher | None = None
        self.ready = False
        # Generation never shares the scoring worker: a long sampling run must not stall scoring.
        self._generate_pool = ThreadPoolExecutor(1, thread_name_prefix="opd-generate")
        self._generate_pending = 0
        # The model loads on its own thread; kept so that stop() can wait for a load that a
        # shutdown interrupted and then close what it started (vLLM's engine processes).
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="opd-load")
        self._loading: Future[ModelInfo] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Load the model off the event loop, start the batcher, warm up, then mark ready."""
        self.backend = self._backend_factory(self.settings)
        self._loading = self._loader.submit(self.backend.load)
        self.info = await asyncio.wrap_future(self._loading)
        if self._stopping:
            return  # stopped while loading: no warm-up, no calibration, stop() closes it
        self.limits = self.info.limits
        self.batcher = Batcher(
            self.backend,
            self.metrics,
            model_name=self.info.name,
            max_batch_tokens=self.settings.pack_budget(
                str(self.backend.device), self.backend.streams
            ),
            max_queue_tokens=self.settings.max_queue_tokens,
            max_wait_ms=self.settings.max_wait_ms,
            max_queue_wait_s=self.settings.max_queue_wait_s or None,
        )
        self.batcher.start()
        if self.settings.warmup:
            started = time.perf_counter()
            item = ScoreItem(
                token_ids=np.arange(min(16, self.info.vocab_size), dtype=np.int32),
                score_from=1,
                candidate_ids=None,
                options=ScoreOptions(top_k=min(4, self.limits.max_top_k), entropy=True),
            )
            await self.batcher.run_in_worker(self.backend.score_pack, [item])
            logger.info("warm-up took %.2fs", time.perf_counter() - started)
            if self.settings.max_queue_wait_s:
                # Only the wait bound needs a throughput before the first request (23 s on
                # vLLM on 2 cores); without it the estimate comes from the real passes.
                await self._calibrate()
        self.ready = True
        self.metrics.backend_info.labels(
            backend=self.info.backend,
            device=str(self.backend.device),
            streams=str(self.backend.streams),
            cpu_gemm=self.backend.gemm,
        ).set(1)
        self.metrics.ready.set(1)

    async def _calibrate(self) -> None:
        """Time a pack of 512-token sequences, so admission by expected wait
        (max_queue_wait_s) has a throughput to divide by before the first real request.

        At most 2,048 tokens: a full 8,192-token vLLM pack took most of a minute per timing on
        a 2-core CPU, and tokens/s changes little above a few hundred tokens per pass; the
        running estimate follows the real passes from the first request on."""
        assert self.batcher is not None and self.info is not None and self.backend is not None
        length = min(512, self.limits.max_tokens_per_sequence)
        count = max(1, min(self.batcher.max_batch_tokens, 2048) // length)
        rng = np.random.default_rng(0)
        items = [
            ScoreItem(
                token_ids=rng.integers(0, self.info.vocab_size, length, dtype=np.int32),
                score_from=1,
                candidate_ids=None,
                options=ScoreOptions(),
            )
            for _ in range(count)
        ]
        elapsed = []
        for _ in range(2):  # the first full pack pays one-time allocation costs: keep the best
            started = time.perf_counter()
            await self.batcher.run_in_worker(self.backend.score_pack, items)
            elapsed.append(time.perf_counter() - started)
        self.batcher.calibrate(length * count, min(elapsed))
        logger.info("throughput at start: %.0f tokens/s", self.batcher.tokens_per_s)

    async def stop(self) -> None:
        self.ready = False
        self._stopping = True
        self.metrics.ready.set(0)
        if self._loading is not None and not self._loading.done():
            # A load cannot be interrupted: wait for it, so that close() below stops the
            # engines it started instead of leaving them to the interpreter's exit.
            logger.info("stopping while the model loads: waiting for the load to finish")
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(self._loading)
        self._loader.shutdown(wait=False)
        if self.batcher is not None:
            await self.batcher.stop()
        # Not waiting: a generation in flight must not hold the event loop past the drain budget.
        self._generate_pool.shutdown(wait=False, cancel_futures=True)
        if self.backend is not None:
            self.backend.close()

    def model_info(self) -> ModelInfo:
        if self.info is None:
            raise RuntimeError("model not loaded")
        return self.info

    async def tokenizer_files(self) -> bytes:
        """GET /v1/tokenizer's JSON, built once (saving a 262k-token tokenizer takes a while,
        and it never changes while the model is loaded); 501 for a slow tokenizer."""
        if self._tokenizer_json is None:
            assert self.backend is not None and self.info is not None
            try:
                files = await asyncio.to_thread(tokenizer_files, self.backend.tokenizer)
            except ValueError as exc:
                raise ContractError(
                    str(exc), field="tokenizer", status=501, kind="not_implemented"
                ) from None
            answer = TokenizerFiles(
                tokenizer_fingerprint=self.info.tokenizer_fingerprint, files=files
            )
            self._tokenizer_json = answer.model_dump_json().encode()
        return self._tokenizer_json

    def check(self, req: PackedRequest) -> None:
        """The one validation of a score request, whichever route built it: a ContractError
        naming the field and the limit (the drop-in routes rename the field to theirs)."""
        assert self.info is not None
        validate_request(req, self.limits, self.info.vocab_size)

    def decode(self, body: bytes, content_type: str | None) -> tuple[PackedRequest, str]:
        enc = request_encoding(content_type)
        req = decode_request_msgpack(body) if enc == "msgpack" else decode_request_json(body)
        self.check(req)
        return req, enc

    async def score_packed(self, req: PackedRequest) -> PackedResult:
        """Score a checked request through the batcher, counted here for every route."""
        assert self.batcher is not None
        result = await self.batcher.submit(req)
        self.metrics.scored(result)
        return result.cast(req.options.logprob_dtype)

    async def score(self, body: bytes, content_type: str | None, accept: str | None) -> Encoded:
        req, enc = self.decode(body, content_type)
        result = await self.score_packed(req)
        out = response_encoding(accept, enc)
        scored = int(result.scored_offsets_n1[-1])
        if out == "msgpack":
            return Encoded(
                encode_result_msgpack(result), MSGPACK_MEDIA_TYPE, scored, result.input_tokens
            )
        return Encoded(result_to_json_dict(result), JSON_MEDIA_TYPE, scored, result.input_tokens)

    async def generate(self, body: bytes, content_type: str | None) -> GenerateResponse:
        """Teacher completions (POST /v1/generate): parse, render prompts, validate, sample."""
        if not self.settings.generate or not (self.backend and self.backend.can_generate):
            raise ContractError(
                "generation is not available on this server (OPD_GENERATE=false, or its "
                "generate engine failed to start: see the server log)",
                field="generate",
                status=501,
                kind="not_implemented",
            )
        if request_encoding(content_type) != "json":
            raise ContractError(
                f"POST /v1/generate takes {JSON_MEDIA_TYPE} only",
                field="Content-Type",
                status=415,
                kind="unsupported_media_type",
            )
        req = validate_wire(GenerateRequest, json_object(body))
        if (req.prompts is None) == (req.prompt_token_ids is None):
            raise ContractError("give exactly one of prompts or prompt_token_ids", field="prompts")
        assert self.backend is not None and self.info is not None
        if req.n_prompts > self.limits.max_sequences:  # before rendering them all
            raise ContractError(
                f"{req.n_prompts} prompts exceed max_sequences={self.limits.max_sequences}",
                field="prompts" if req.prompts is not None else "prompt_token_ids",
                limit=self.limits.max_sequences,
            )
        tokenizer = self.backend.tokenizer
        if req.prompts is not None:
            field = "prompts"
            ids = await asyncio.to_thread(
                lambda: [chat_prompt_ids(tokenizer, p) for p in req.prompts or []]
            )
        else:
            field, ids = "prompt_token_ids", req.prompt_token_ids or []
        validate_generate(req, ids, self.limits, self.info.vocab_size, field)
        if self._generate_pending >= self.settings.max_generate_queue:
            raise QueueFull(
                self._generate_pending,
                self.settings.max_generate_queue,
                retry_after=1,
                field="max_generate_queue",
                unit="generate requests",
            )
        self._generate_pending += 1
        try:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(
                self._generate_pool, self._generate_and_decode, ids, req
            )
        finally:
            self._generate_pending -= 1
        completion_tokens = sum(len(c.token_ids) for r in results for c in r.completions)
        self.metrics.generated_tokens.inc(completion_tokens)
        return GenerateResponse(
            model=self.info.name,
            results=results,
            usage=GenerateUsage(
                prompts=len(ids),
                prompt_tokens=sum(len(p) for p in ids),
                completion_tokens=completion_tokens,
            ),
        )

    def _generate_and_decode(
        self, ids: list[list[int]], req: GenerateRequest
    ) -> list[GenerateResult]:
        assert self.backend is not None
        tokenizer = self.backend.tokenizer
        generated: list[list[Generated]] = self.backend.generate(ids, req)

        def completion(g: Generated) -> GeneratedCompletion:
            text = tokenizer.decode(g.token_ids, skip_special_tokens=True)  # type: ignore[attr-defined]
            return GeneratedCompletion(
                text=text,
                token_ids=g.token_ids,
                finish_reason=g.finish_reason,  # type: ignore[arg-type]
            )

        return [
            GenerateResult(prompt_token_ids=p, completions=[completion(g) for g in gens])
            for p, gens in zip(ids, generated, strict=True)
        ]
