"""The client's exception tree: one base class, one function mapping a response to an error.

    OPDClientError
    ├── TeacherConnectionError        transport failed after all retries (refused, reset, timeout)
    ├── IncompatibleTeacherError      protocol major or tokenizer fingerprint differs
    └── TeacherHTTPError              the service answered non-2xx; .status, .detail (ErrorDetail)
        ├── BadRequestError           400 malformed body
        ├── AuthenticationError       401
        ├── DeadlineExceededError     408 (its X-OPD-Deadline passed while queued; not retried)
        ├── PayloadTooLargeError      413
        ├── UnsupportedMediaTypeError 415
        ├── RequestValidationError    422 (a field broke a limit: .detail.field, .detail.limit)
        ├── OverloadedError           429 (retried; raised when retries are exhausted)
        ├── TeacherInternalError      500 (.detail.request_id finds it in the server log)
        └── TeacherUnavailableError   503 (loading or draining; retried)

A request the client builds itself is validated before sending: a broken one raises
opd.shared.errors.ContractError locally, with the same field names the server would use.
"""

from __future__ import annotations

import json

from opd.shared.errors import ErrorBody, ErrorDetail


class OPDClientError(Exception):
    """Base of every error this client raises (besides ContractError for local validation)."""


class TeacherConnectionError(OPDClientError):
    pass


class IncompatibleTeacherError(OPDClientError):
    pass


class TeacherHTTPError(OPDClientError):
    def __init__(self, status: int, detail: ErrorDetail, retry_after: float | None = None):
        where = f" [{detail.field}]" if detail.field else ""
        rid = f" (request_id {detail.request_id})" if detail.request_id else ""
        super().__init__(f"HTTP {status}{where}: {detail.message}{rid}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class BadRequestError(TeacherHTTPError):
    pass


class AuthenticationError(TeacherHTTPError):
    pass


class PayloadTooLargeError(TeacherHTTPError):
    pass


class UnsupportedMediaTypeError(TeacherHTTPError):
    pass


class RequestValidationError(TeacherHTTPError):
    pass


class OverloadedError(TeacherHTTPError):
    pass


class DeadlineExceededError(TeacherHTTPError):
    """The server dropped the request's work, uncomputed, when its deadline passed."""


class TeacherInternalError(TeacherHTTPError):
    pass


class TeacherUnavailableError(TeacherHTTPError):
    pass


_BY_STATUS: dict[int, type[TeacherHTTPError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    408: DeadlineExceededError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: RequestValidationError,
    429: OverloadedError,
    500: TeacherInternalError,
    503: TeacherUnavailableError,
}

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


def parse_error(status: int, body: bytes, retry_after: str | None = None) -> TeacherHTTPError:
    """Map a non-2xx answer to the typed error; tolerate bodies that are not our error shape."""
    try:
        detail = ErrorBody.model_validate(json.loads(body)).error
    except Exception:
        text = body[:500].decode("utf-8", "replace") if body else ""
        detail = ErrorDetail(type="http_error", message=text or f"HTTP {status}")
    cls = _BY_STATUS.get(status, TeacherInternalError if status >= 500 else TeacherHTTPError)
    return cls(status, detail, parse_retry_after(retry_after))
