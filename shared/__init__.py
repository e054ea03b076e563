"""opd.shared: the versioned contract between the teacher service and its clients.

It holds the wire schemas, the limits both sides enforce, the JSON and binary codecs and the
tokenizer fingerprint. It depends on pydantic, numpy and msgpack only (never torch or FastAPI), so
a client can be installed without the server's heavy dependencies.
"""

from opd.shared.errors import ContractError, ErrorBody, ErrorDetail
from opd.shared.limits import Limits
from opd.shared.packed import PackedRequest, PackedResult, SequenceScores
from opd.shared.schemas import (
    GeneratedCompletion,
    GenerateOptions,
    GenerateRequest,
    GenerateResponse,
    GenerateResult,
    ModelInfo,
    ScoreOptions,
    ScoreRequest,
    ScoreResponseJSON,
    SequenceIn,
)
from opd.shared.version import PROTOCOL_VERSION

__all__ = [
    "PROTOCOL_VERSION",
    "ContractError",
    "ErrorBody",
    "ErrorDetail",
    "GenerateOptions",
    "GenerateRequest",
    "GenerateResponse",
    "GenerateResult",
    "GeneratedCompletion",
    "Limits",
    "ModelInfo",
    "PackedRequest",
    "PackedResult",
    "ScoreOptions",
    "ScoreRequest",
    "ScoreResponseJSON",
    "SequenceIn",
    "SequenceScores",
]
