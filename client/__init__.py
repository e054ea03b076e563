"""opd.client: the student side of on-policy distillation.

`TeacherClient` / `AsyncTeacherClient` talk to a teacher scoring service (opd.server) and return
numpy arrays; the `opd` command line lives in opd.client.cli.
"""

from opd.client.teacher.client import AsyncTeacherClient, TeacherClient
from opd.client.teacher.errors import (
    AuthenticationError,
    DeadlineExceededError,
    IncompatibleTeacherError,
    OPDClientError,
    OverloadedError,
    RequestValidationError,
    TeacherConnectionError,
    TeacherHTTPError,
    TeacherInternalError,
    TeacherUnavailableError,
)

__all__ = [
    "AsyncTeacherClient",
    "AuthenticationError",
    "IncompatibleTeacherError",
    "OPDClientError",
    "DeadlineExceededError",
    "OverloadedError",
    "RequestValidationError",
    "TeacherClient",
    "TeacherConnectionError",
    "TeacherHTTPError",
    "TeacherInternalError",
    "TeacherUnavailableError",
]
