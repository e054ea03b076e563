"""Errors on the drop-in routes, in the shape their clients parse: OpenAI's.

vLLM answers every error of its OpenAI routes as ``{"error": {"message", "type", "param",
"code"}}`` with `code` the HTTP status, and the OpenAI SDK (which prime-rl and many scripts use)
reads exactly that. opd's own routes keep opd's shape (opd.shared.errors); the app's handlers
ask `is_dropin_path` which one a request gets. Bad input is a 400 here, as vLLM answers it
(opd's own routes say 422), and the message still names the field and the limit.

The limits are not checked here: a drop-in route builds the native score request and the
contract's validation (opd.shared.validation, through ScoringService.check) refuses it;
`in_route_terms` only renames the refused field to what the route's caller sent.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel

from opd.shared.errors import ContractError, ErrorDetail

# The paths the drop-in routes answer on (prefixes end in "/").
DROPIN_PATHS = frozenset(
    {
        "/v1/models",
        "/v1/completions",
        "/inference/v1/generate",
        "/generate",
        "/get_sequence_logprobs/",
    }
)

# OpenAI's error type names by status (what vLLM and the OpenAI SDK use).
_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    413: "BadRequestError",
    415: "BadRequestError",
    422: "BadRequestError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


class OpenAIErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorInfo


def is_dropin_path(path: str) -> bool:
    return path in DROPIN_PATHS


def dropin_status(status: int) -> int:
    """vLLM answers malformed or out-of-limit input with 400; opd's own routes with 422."""
    return 400 if status == 422 else status


def openai_error(status: int, detail: ErrorDetail) -> dict:
    """The OpenAI error body for an opd error detail (request id: the X-Request-ID header)."""
    status = dropin_status(status)
    info = OpenAIErrorInfo(
        message=detail.message,
        type=_TYPES.get(status, "BadRequestError"),
        param=detail.field,
        code=status,
    )
    return OpenAIErrorBody(error=info).model_dump()


@dataclass(frozen=True)
class Terms:
    """What a drop-in route calls the parts of the native score request it builds."""

    prompts: str  # the sequences: "prompt", "token_ids", "input_ids", "sequences"
    top_k: str  # the count that became the request's top_k
    temperature: str = "temperature"
    candidates: str = "prompt_logprob_token_ids"  # the ids that became candidate_ids


# A native field inside one sequence: sequences[i], sequences[i].token_ids[j], ...
_IN_SEQUENCE = re.compile(r"sequences\[(\d+)\](?:\.(\w+))?(?:\[(\d+)\])?")


def in_route_terms(exc: ContractError, terms: Terms, grown: Sequence[bool]) -> ContractError:
    """The contract's refusal of a drop-in route's native request, in the route's terms.

    The field becomes the route's own (with the prompt's index when it sent several), the
    message starts with it and keeps the contract's limit; `grown[i]` says that prompt i was
    sent with one more token than the caller's (the row of the token to generate)."""
    field = exc.field or ""
    message = exc.message
    inside = _IN_SEQUENCE.fullmatch(field)
    if field == "top_k":
        param = terms.top_k
    elif field == "temperature":
        param = terms.temperature
    elif "candidate_ids" in field:
        param = terms.candidates
    elif inside is not None:
        i, part, position = int(inside[1]), inside[2], inside[3]
        param = f"{terms.prompts}[{i}]" if len(grown) > 1 else terms.prompts
        if part == "token_ids" and position is not None:
            message += f" (position {position})"
        elif part == "token_ids" and grown[i]:
            message += " (the prompt and the one token to generate)"
    else:  # the request as a whole: how many prompts, how many tokens
        param = terms.prompts
    return ContractError(
        f"{param}: {message}", field=param, limit=exc.limit, status=exc.status, kind=exc.kind
    )


def bad_request(message: str, param: str, limit: float | int | str | None = None) -> ContractError:
    """A 400 naming the offending field of the drop-in request."""
    return ContractError(message, field=param, limit=limit, status=400)


def model_not_found(name: str) -> ContractError:
    """vLLM's answer to a request naming a model the server does not serve."""
    return ContractError(
        f"The model `{name}` does not exist.", field="model", status=404, kind="not_found"
    )
