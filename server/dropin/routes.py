"""The drop-in routes on the app: health, model list and the scoring routes of other servers.

Each handler reads the body as opd's own routes do (opd.server.routes.Serving: readiness, size
limit, payload metrics), parses it into its route's request model, turns it into PromptJobs,
scores them through the service (the validation and batcher of /v1/score) and writes the answer
in its route's shape, off the event loop when it is large. Auth (where a key is set) is the
app's; errors leave through the app's handlers in OpenAI's shape (opd.server.dropin.errors).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from opd.server.dropin import completions, prime_generate, sglang_generate, trl_legacy
from opd.server.dropin.errors import OpenAIErrorBody, Terms, bad_request, model_not_found
from opd.server.dropin.models import ModelCard, ModelList, model_card
from opd.server.dropin.prompt_scores import PromptJob, PromptScores, score_prompts
from opd.server.dropin.vllm_shapes import TokenTexts
from opd.server.openapi_doc import request_body
from opd.server.request_body import parse_json
from opd.server.routes import Serving
from opd.server.service import ScoringService
from opd.server.settings import Settings
from opd.shared.version import JSON_MEDIA_TYPE

# Answers larger than this are serialised in a worker thread, so the event loop keeps serving.
_INLINE_POSITIONS = 2048

RequestModel = TypeVar("RequestModel", bound=BaseModel)

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


@dataclass
class Scoring:
    """A drop-in request as the scoring path takes it: the prompt jobs, at what temperature and
    in whose terms, then how to answer with their scores and how many positions the answer
    holds (large ones are serialised off the event loop)."""

    jobs: list[PromptJob]
    temperature: float
    terms: Terms
    respond: Callable[[list[PromptScores]], Any]
    positions: int


def dropin_router(ctx: DropInContext, require_api_key: Callable[..., Any]) -> APIRouter:
    router = APIRouter(tags=["drop-in"])
    auth = [Depends(require_api_key)]

    def scoring_route(
        path: str, model: type[RequestModel], plan: Callable[[RequestModel], Awaitable[Scoring]]
    ) -> None:
        """POST `path`: the body parsed into `model`, planned by `plan` (whose name and
        docstring the route takes), scored through the service and answered."""

        async def route(request: Request) -> Response:
            body = await ctx.serving.receive(request)
            s = await plan(parse_json(body, model))
            scores = await score_prompts(ctx.service, s.jobs, s.temperature, s.terms)
            return await ctx.answer(request, lambda: s.respond(scores), s.positions)

        route.__name__ = route.__qualname__ = plan.__name__
        route.__doc__ = plan.__doc__
        post = router.post(
            path, dependencies=auth, responses=_ERRORS, openapi_extra=request_body(model)
        )
        post(route)

    @router.get("/health")
    @router.get("/health/", include_in_schema=False)
    async def health() -> Response:
        """Alive (vLLM's /health: 200, empty body; TRL polls /health/ too)."""
        return Response(status_code=200)

    @router.get("/v1/models", response_model=ModelList, dependencies=auth)
    async def list_models() -> ModelList:
        """The served model, in vLLM's list shape."""
        return ModelList(data=ctx.models())

    async def v1_completions(req: completions.CompletionRequest) -> Scoring:
        """vLLM's /v1/completions for scoring: prompt_logprobs, max_tokens 0 or 1."""
        ctx.check_model(req.model)
        completions.refuse_unsupported(req)
        prompts = await asyncio.to_thread(completions.prompt_ids, req, ctx.tokenizer)
        jobs = completions.jobs_for(req, prompts)
        return Scoring(
            jobs,
            score_temperature(req.temperature),
            completions.terms(req),
            lambda scores: completions.response(
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

    async def inference_generate(req: prime_generate.TokensRequest) -> Scoring:
        """vLLM's token-in/token-out route as prime-rl calls it for teacher prefill."""
        ctx.check_model(req.model)
        prime_generate.refuse_unsupported(req)
        job = prime_generate.job_for(req)
        return Scoring(
            [job],
            score_temperature(req.sampling_params.temperature, "sampling_params.temperature"),
            prime_generate.terms(req),
            lambda scores: prime_generate.response(
                req, ctx.served_name(), job, scores[0], ctx.texts, ctx.eos_id
            ),
            len(req.token_ids),
        )

    async def sglang_generate_route(req: sglang_generate.GenerateReqInput) -> Scoring:
        """SGLang's native /generate as slime's on-policy distillation calls it."""
        prompts = await asyncio.to_thread(sglang_generate.prompt_ids, req, ctx.tokenizer)
        jobs = sglang_generate.jobs_for(req, prompts)
        temperature = score_temperature(
            sglang_generate.temperature(req), "sampling_params.temperature"
        )
        return Scoring(
            jobs,
            temperature,
            sglang_generate.terms(req),
            lambda scores: sglang_generate.response(
                req, prompts, jobs, scores, ctx.texts, ctx.eos_id
            ),
            sum(len(p) for p in prompts),
        )

    async def get_sequence_logprobs(req: trl_legacy.SequenceLogprobsRequest) -> Scoring:
        """TRL <= 1.10's `trl vllm-serve` scoring route (JSON and base64 binary answers)."""
        jobs = trl_legacy.jobs_for(req)
        return Scoring(
            jobs,
            score_temperature(req.temperature),
            trl_legacy.TERMS,
            lambda scores: trl_legacy.response(req, jobs, scores),
            sum(len(s) for s in req.sequences),
        )

    scoring_route("/v1/completions", completions.CompletionRequest, v1_completions)
    scoring_route("/inference/v1/generate", prime_generate.TokensRequest, inference_generate)
    scoring_route("/generate", sglang_generate.GenerateReqInput, sglang_generate_route)
    scoring_route(
        "/get_sequence_logprobs/", trl_legacy.SequenceLogprobsRequest, get_sequence_logprobs
    )
    return router
