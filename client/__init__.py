"""opd.client: the student side of on-policy distillation.

`TeacherClient` / `AsyncTeacherClient` talk to a teacher scoring service (opd.server) and return
numpy arrays; the `opd` command line lives in opd.client.cli.
"""

from opd.client.errors import (
    AuthenticationError,
    IncompatibleTeacherError,
    OPDClientError,
    OverloadedError,
    RequestValidationError,
    TeacherConnectionError,
    TeacherHTTPError,
    TeacherInternalError,
    TeacherUnavailableError,
)
from opd.client.teacher import AsyncTeacherClient, TeacherClient

__all__ = [
    "AsyncTeacherClient",
    "AuthenticationError",
    "IncompatibleTeacherError",
    "OPDClientError",
    "OverloadedError",
    "RequestValidationError",
    "TeacherClient",
    "TeacherConnectionError",
    "TeacherHTTPError",
    "TeacherInternalError",
    "TeacherUnavailableError",
]
