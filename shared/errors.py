"""One error shape on the wire, and the contract's own validation error.

Every non-2xx answer of the service has the body::

    {"error": {"type": "validation_error", "message": "...", "field": "sequences[3].token_ids",
               "limit": 4096, "request_id": "..."}}

`ContractError` is raised by the shared validation (opd.shared.validation) on either side; the
server maps it to 422 (or 413 for size limits), the client raises it before sending so a request
it built itself is never refused.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="machine-readable kind, e.g. validation_error, queue_full")
    message: str = Field(description="human-readable explanation naming the field and the limit")
    field: str | None = Field(default=None, description="path of the offending field, if any")
    limit: float | int | str | None = Field(default=None, description="the limit that was exceeded")
    request_id: str | None = Field(default=None, description="id to find this request in the logs")


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


class ContractError(ValueError):
    """A request breaks the contract: names the field, the limit and the HTTP status to use."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        limit: float | int | str | None = None,
        status: int = 422,
        kind: str = "validation_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.limit = limit
        self.status = status
        self.kind = kind

    def detail(self, request_id: str | None = None) -> ErrorDetail:
        return ErrorDetail(
            type=self.kind,
            message=self.message,
            field=self.field,
            limit=self.limit,
            request_id=request_id,
        )
