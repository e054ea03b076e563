"""Reading a request body within the size limit, shared by opd's routes and the drop-in ones.

The limit is enforced while the body streams in, so a client cannot make the server buffer more
than `max_body_bytes` before it is refused (413), whatever Content-Length it declares.
"""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel

from opd.shared.codec import json_object, validate_wire
from opd.shared.errors import ContractError

M = TypeVar("M", bound=BaseModel)


def _too_large(message: str, limit: int) -> ContractError:
    return ContractError(message, field="body", limit=limit, status=413, kind="payload_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it would exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(f"body of {declared} bytes exceeds max_body_bytes={limit}", limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"body exceeds max_body_bytes={limit}", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes, model: type[M], status: int = 400) -> M:
    """A JSON object body as `model`, strictly typed (opd.shared.codec.validate_wire);
    malformed JSON or a bad field is a ContractError naming the field (status 400 on the
    drop-in routes, as vLLM answers)."""
    return validate_wire(model, json_object(body), status)
