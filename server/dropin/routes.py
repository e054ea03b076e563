"""The drop-in routes on the app: health, model list and the scoring routes of other servers.

Each handler reads the body as opd's own routes do (opd.server.routes.Serving: readiness, size
limit, payload metrics), parses it into its route's request model, turns it into PromptJobs,
scores them through the service (the validation and batcher of /v1/score) and writes the answer
in its route's shape, off the event loop when it is large. Auth (where a key is set) is the
app's; errors leave through the app's handlers in OpenAI's shape (opd.server.dropin.errors).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request, Response

from opd.server.dropin import completions, prime_generate, sglang_generate, trl_legacy
from opd.server.dropin.errors import OpenAIErrorBody, bad_request, model_not_found
from opd.server.dropin.models import ModelCard, ModelList, model_card
from opd.server.dropin.prompt_scores import score_prompts
from opd.server.dropin.vllm_shapes import TokenTexts
from opd.server.openapi_doc import request_body
from opd.server.request_body import parse_json
from opd.server.routes import Serving
from opd.server.service import ScoringService
from opd.server.settings import Settings
from opd.shared.version import JSON_MEDIA_TYPE

# Answers larger than this are serialised in a worker thread, so the event loop keeps serving.
_INLINE_POSITIONS = 2048

_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": OpenAIErrorBody} for s in (400, 401, 404, 413, 429, 500, 503)
}


@dataclass
class DropInContext:
    """What the routes need from the app: its Serving (service, readiness, counted bodies),
    the settings that name the served model, and when the server started."""

    serving: Serving
    settings: Settings
    created: int  # unix time, vLLM's `created` of the model card
    _texts: TokenTexts | None = None

    @property
    def service(self) -> ScoringService:
        return self.serving.service

    @property
    def texts(self) -> TokenTexts:
        if self._texts is None:
            info = self.service.info
            self._texts = TokenTexts(self.service.backend.tokenizer, info.vocab_size)
        return self._texts

    @property
    def tokenizer(self) -> Any:
        return self.service.backend.tokenizer

    @property
    def eos_id(self) -> int | None:
        return getattr(self.tokenizer, "eos_token_id", None)

    @property
    def fingerprint(self) -> str:
        """system_fingerprint: the server and the weights' revision (vLLM: vllm-VERSION-hash)."""
        return f"opd-{self.service.info.revision[:12]}"

    def served_name(self) -> str:
        """OPD_SERVED_MODEL_NAME, else the model's own name."""
        return self.settings.served_model_name or self.service.model_info().name

    def models(self) -> list[ModelCard]:
        self.serving.ensure_ready()
        info = self.service.model_info()
        root = self.settings.model or info.name
        return [model_card(self.served_name(), root, info.max_model_len, self.created)]

    def check_model(self, name: str | None) -> None:
        """A request naming another model gets vLLM's 404; no name means the served one."""
        if name is not None and name != self.served_name():
            raise model_not_found(name)

    async def answer(self, request: Request, build: Callable[[], Any], positions: int) -> Response:
        """The JSON answer; built in a thread when it holds many positions."""

        def encode() -> bytes:
            return orjson.dumps(build(), option=orjson.OPT_SERIALIZE_NUMPY)

        payload = encode() if positions < _INLINE_POSITIONS else await asyncio.to_thread(encode)
        return self.serving.reply(request, payload, JSON_MEDIA_TYPE)


def score_temperature(temperature: float | None, field: str = "temperature") -> float:
    """Temperature for the numbers: unset or 0 (greedy sampling) scores at T = 1, as vLLM's
    prompt log-probs are. A negative (or NaN) one is a 400, as vLLM's SamplingParams refuse it;
    the service's own range check then bounds the rest."""
    if not temperature:
        return 1.0
    if not temperature > 0:  # also catches NaN
        raise bad_request(f"{field}={temperature} must be non-negative", field, 0)
    return float(temperature)


def dropin_router(ctx: DropInContext, require_api_key: Callable[..., Any]) -> APIRouter:
    router = APIRouter(tags=["drop-in"])
    auth = [Depends(require_api_key)]

    @router.get("/health")
    @router.get("/health/", include_in_schema=False)
    async def health() -> Response:
        """Alive (vLLM's /health: 200, empty body; TRL polls /health/ too)."""
        return Response(status_code=200)

    @router.get("/v1/models", response_model=ModelList, dependencies=auth)
    async def list_models() -> ModelList:
        """The served model, in vLLM's list shape."""
        return ModelList(data=ctx.models())

    @router.post(
        "/v1/completions",
        dependencies=auth,
        responses=_ERRORS,
        openapi_extra=request_body(completions.CompletionRequest),
    )
    async def v1_completions(request: Request) -> Response:
        """vLLM's /v1/completions for scoring: prompt_logprobs, max_tokens 0 or 1."""
        body = await ctx.serving.receive(request)
        req = parse_json(body, completions.CompletionRequest)
        ctx.check_model(req.model)
        completions.refuse_unsupported(req)
        prompts = await asyncio.to_thread(completions.prompt_ids, req, ctx.tokenizer)
        jobs = completions.jobs_for(req, prompts)
        scores = await score_prompts(
            ctx.service, jobs, score_temperature(req.temperature), completions.terms(req)
        )
        return await ctx.answer(
            request,
            lambda: completions.response(
                req,
                ctx.served_name(),
                prompts,
                jobs,
                scores,
                ctx.texts,
                ctx.eos_id,
                ctx.fingerprint,
            ),
            sum(len(p) for p in prompts),
        )

    @router.post(
        "/inference/v1/generate",
        dependencies=auth,
        responses=_ERRORS,
        openapi_extra=request_body(prime_generate.TokensRequest),
    )
    async def inference_generate(request: Request) -> Response:
        """vLLM's token-in/token-out route as prime-rl calls it for teacher prefill."""
        body = await ctx.serving.receive(request)
        req = parse_json(body, prime_generate.TokensRequest)
        ctx.check_model(req.model)
        prime_generate.refuse_unsupported(req)
        job = prime_generate.job_for(req)
        (scores,) = await score_prompts(
            ctx.service,
            [job],
            score_temperature(req.sampling_params.temperature, "sampling_params.temperature"),
            prime_generate.terms(req),
        )
        return await ctx.answer(
            request,
            lambda: prime_generate.response(
                req, ctx.served_name(), job, scores, ctx.texts, ctx.eos_id
            ),
            len(req.token_ids),
        )

    @router.post(
        "/generate",
        dependencies=auth,
        responses=_ERRORS,
        openapi_extra=request_body(sglang_generate.GenerateReqInput),
    )
    async def sglang_generate_route(request: Request) -> Response:
        """SGLang's native /generate as slime's on-policy distillation calls it."""
        body = await ctx.serving.receive(request)
        req = parse_json(body, sglang_generate.GenerateReqInput)
        prompts = await asyncio.to_thread(sglang_generate.prompt_ids, req, ctx.tokenizer)
        jobs = sglang_generate.jobs_for(req, prompts)
        temperature = score_temperature(
            sglang_generate.temperature(req), "sampling_params.temperature"
        )
        scores = await score_prompts(ctx.service, jobs, temperature, sglang_generate.terms(req))
        return await ctx.answer(
            request,
            lambda: sglang_generate.response(req, prompts, jobs, scores, ctx.texts, ctx.eos_id),
            sum(len(p) for p in prompts),
        )

    @router.post(
        "/get_sequence_logprobs/",
        dependencies=auth,
        responses=_ERRORS,
        openapi_extra=request_body(trl_legacy.SequenceLogprobsRequest),
    )
    async def get_sequence_logprobs(request: Request) -> Response:
        """TRL <= 1.10's `trl vllm-serve` scoring route (JSON and base64 binary answers)."""
        body = await ctx.serving.receive(request)
        req = parse_json(body, trl_legacy.SequenceLogprobsRequest)
        jobs = trl_legacy.jobs_for(req)
        scores = await score_prompts(
            ctx.service, jobs, score_temperature(req.temperature), trl_legacy.TERMS
        )
        return await ctx.answer(
            request,
            lambda: trl_legacy.response(req, jobs, scores),
            sum(len(s) for s in req.sequences),
        )

    return router
