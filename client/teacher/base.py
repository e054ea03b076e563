"""What the sync and async teacher clients share: config, splitting, encoding, retry policy.

The two client classes in opd.client.teacher.client only do I/O; everything that decides *what* to
send and *how to read* the answer lives here, once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np

from opd.client.teacher.errors import RETRYABLE_STATUS, IncompatibleTeacherError, parse_error
from opd.client.teacher.replicas import ReplicaSet, normalise_urls
from opd.shared.codec import (
    decode_result_msgpack,
    encode_request_msgpack,
    result_from_json_dict,
)
from opd.shared.limits import Limits
from opd.shared.packed import PackedRequest, PackedResult
from opd.shared.schemas import (
    GenerateRequest,
    GenerateResponse,
    GenerateUsage,
    ModelInfo,
    ScoreRequest,
)
from opd.shared.validation import validate_request
from opd.shared.version import (
    JSON_MEDIA_TYPE,
    MSGPACK_MEDIA_TYPE,
    PROTOCOL_MAJOR,
    SCORE_SPANS_SINCE,
    at_least,
)

Encoding = Literal["msgpack", "json"]

__all__ = [
    "DEFAULT_MAX_WAIT_S",
    "RETRYABLE_STATUS",
    "BaseTeacherClient",
    "ClientConfig",
    "Encoding",
]

# Envelope overhead of one msgpack request (keys, scalars), generously rounded up.
_MSGPACK_OVERHEAD = 512
# Worst case of one integer in JSON ("2147483647,") for the body-size estimate.
_JSON_BYTES_PER_INT = 12


# A teacher that is down (a pod being rescheduled, a model loading) is waited for this long by
# default: a Kubernetes pod restart with an image pull and a large model load takes minutes.
DEFAULT_MAX_WAIT_S = 600.0


@dataclass
class ClientConfig:
    """Retry policy: a request that fails with a retryable error (connection refused or reset,
    timeout, 429, 502, 503, 504) is retried with capped exponential backoff and jitter until it
    succeeds, until the teacher has been failing it for `max_wait_s` seconds, or, if
    `max_retries` is set, after that many retries, whichever comes first. The bound is time,
    not a count, by default because what a trainer must ride out is a restart, whose length
    is known in seconds (a count of doubling backoffs is about half a minute, shorter than a
    pod restart); `max_retries` is for callers that want to fail fast. With time as the bound,
    the backoff cap `backoff_max_s` only sets how soon a recovered teacher is noticed (at most
    that long, plus any Retry-After), hence 10 s rather than a longer cap."""

    urls: list[str]
    api_key: str | None = None
    encoding: Encoding = "msgpack"
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    max_retries: int | None = None
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    backoff_base_s: float = 0.5
    backoff_max_s: float = 10.0
    concurrency: int = 4
    replica_cooldown_s: float = 5.0
    tokenizer_fingerprint: str | None = None
    allow_tokenizer_mismatch: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    # Sent as X-OPD-Deadline: the server refuses (429) work it expects to start later than
    # this, and drops (408, uncomputed) work still queued when it passes. None: the server's
    # own max_queue_wait_s alone bounds the wait.
    deadline_s: float | None = None

    def httpx_kwargs(self) -> dict[str, Any]:
        headers = {"User-Agent": "opd-client", **self.headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if self.deadline_s is not None:
            headers["X-OPD-Deadline"] = f"{self.deadline_s:g}"
        return {
            "headers": headers,
            "timeout": httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            "limits": httpx.Limits(
                max_connections=max(self.concurrency, 1) * 2,
                max_keepalive_connections=max(self.concurrency, 1) * 2,
            ),
        }


class BaseTeacherClient:
    """What TeacherClient and AsyncTeacherClient hold alike, as httpx's BaseClient is to Client
    and AsyncClient: the config, the replicas and the teacher's model info once connected, and
    the requests a batch is cut into. The two subclasses add the I/O (an httpx client and how
    chunks go out concurrently)."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        api_key: str | None = None,
        encoding: Encoding = "msgpack",
        tokenizer_fingerprint: str | None = None,
        allow_tokenizer_mismatch: bool = False,
        **options: Any,
    ) -> None:
        self.config = ClientConfig(
            urls=normalise_urls(base_url),
            api_key=api_key,
            encoding=encoding,
            tokenizer_fingerprint=tokenizer_fingerprint,
            allow_tokenizer_mismatch=allow_tokenizer_mismatch,
            **options,
        )
        self.replicas = ReplicaSet(self.config.urls, self.config.replica_cooldown_s)
        self._info: ModelInfo | None = None

    def _score_requests(
        self, request: ScoreRequest | PackedRequest, info: ModelInfo
    ) -> list[PackedRequest]:
        """The batch, validated whole, cut into requests under the teacher's limits."""
        packed = to_packed(request)
        if packed.has_spans and not at_least(info.protocol_version, SCORE_SPANS_SINCE):
            raise IncompatibleTeacherError(
                f"score_spans (episodes) needs protocol {'.'.join(map(str, SCORE_SPANS_SINCE))}; "
                f"teacher {info.name} speaks {info.protocol_version}: upgrade the teacher"
            )
        validate_for(packed, info)
        chunks = split_indices(packed, info.limits, self.config.encoding)
        return [packed if len(chunks) == 1 else packed.subset(c) for c in chunks]


def to_packed(request: ScoreRequest | PackedRequest) -> PackedRequest:
    return request if isinstance(request, PackedRequest) else PackedRequest.from_request(request)


def merge_model_infos(infos: dict[str, ModelInfo]) -> ModelInfo:
    """One view of several replicas: they must serve the same model with the same tokenizer;
    the limits are the tightest of each (so no replica ever refuses a split request)."""
    urls = list(infos)
    first = infos[urls[0]]
    for url in urls[1:]:
        other = infos[url]
        for key in ("tokenizer_fingerprint", "vocab_size", "revision", "protocol_version"):
            if getattr(other, key) != getattr(first, key):
                raise IncompatibleTeacherError(
                    f"replicas disagree on {key}: {urls[0]} has {getattr(first, key)!r}, "
                    f"{url} has {getattr(other, key)!r}"
                )
    limits = first.limits.model_copy(
        update={
            name: min(getattr(i.limits, name) for i in infos.values())
            for name in type(first.limits).model_fields
            if name != "min_temperature"
        }
        | {"min_temperature": max(i.limits.min_temperature for i in infos.values())}
    )
    return first.model_copy(update={"limits": limits})


def check_model_info(info: ModelInfo, config: ClientConfig) -> None:
    """Refuse a teacher whose protocol major or tokenizer differs (unless overridden)."""
    major = info.protocol_version.split(".")[0]
    if major != PROTOCOL_MAJOR:
        raise IncompatibleTeacherError(
            f"teacher speaks protocol {info.protocol_version}; "
            f"this client speaks {PROTOCOL_MAJOR}.x"
        )
    expected = config.tokenizer_fingerprint
    if expected and expected != info.tokenizer_fingerprint and not config.allow_tokenizer_mismatch:
        raise IncompatibleTeacherError(
            f"tokenizer fingerprint mismatch: teacher {info.name} has "
            f"{info.tokenizer_fingerprint[:16]}..., the student's is {expected[:16]}...; token ids "
            "would mean different text. Use the teacher's tokenizer, train across tokenizers "
            "(opd train --cross-tokenizer auto), or pass allow_tokenizer_mismatch=True if you "
            "know the vocabularies agree."
        )


def _body_bytes(encoding: Encoding, n_seqs: int, ints: int, n_scored: int) -> int:
    """Upper estimate of an encoded request's size from its counts (`ints`: token ids,
    candidate ids and span bounds; a span offset per sequence is in the per-sequence term)."""
    if encoding == "msgpack":
        return _MSGPACK_OVERHEAD + 4 * ints + 20 * n_seqs + 16
    return 256 + _JSON_BYTES_PER_INT * ints + 64 * n_seqs + 4 * n_scored


def split_indices(req: PackedRequest, limits: Limits, encoding: Encoding) -> list[list[int]]:
    """Cut a batch into consecutive chunks that respect every request-level limit, greedily.

    Whole sequences only: a sequence's scored spans and its candidate rows (one per scored
    position) go with it."""
    lens, n_scored = req.seq_lens_n, req.n_scored_n
    n_spans = (
        np.diff(req.span_offsets_n1)
        if req.span_offsets_n1 is not None
        else np.zeros(req.n_sequences, dtype=np.int64)
    )
    k = req.n_candidates
    chunks: list[list[int]] = []
    current: list[int] = []
    tokens = ints = scored = 0
    for i in range(req.n_sequences):
        n, m = int(lens[i]), int(n_scored[i])
        own = n + m * k + 2 * int(n_spans[i])
        too_big = (
            len(current) + 1 > limits.max_sequences
            or tokens + n > limits.max_total_tokens
            or _body_bytes(encoding, len(current) + 1, ints + own, scored + m)
            > limits.max_body_bytes
        )
        if current and too_big:
            chunks.append(current)
            current, tokens, ints, scored = [], 0, 0, 0
        current.append(i)
        tokens, ints, scored = tokens + n, ints + own, scored + m
    if current:
        chunks.append(current)
    return chunks


def validate_for(req: PackedRequest, info: ModelInfo) -> None:
    """Per-sequence validation on the whole batch before splitting (field names stay global)."""
    unbounded = info.limits.model_copy(update={"max_sequences": 2**62, "max_total_tokens": 2**62})
    validate_request(req, unbounded, info.vocab_size)


def encode(req: PackedRequest, encoding: Encoding) -> tuple[bytes, dict[str, str]]:
    if encoding == "msgpack":
        return encode_request_msgpack(req), {
            "Content-Type": MSGPACK_MEDIA_TYPE,
            "Accept": MSGPACK_MEDIA_TYPE,
        }
    return _json_body(req), {"Content-Type": JSON_MEDIA_TYPE, "Accept": JSON_MEDIA_TYPE}


def _json_body(req: PackedRequest) -> bytes:
    import json

    sequences = []
    for i in range(req.n_sequences):
        seq: dict[str, Any] = {"token_ids": req.tokens(i).tolist()}
        if req.has_spans:  # exactly one of the two (protocol 1.3)
            seq["score_spans"] = req.spans(i).tolist()
        else:
            seq["score_from"] = int(req.score_from_n[i])
        cands = req.candidates(i)
        if cands is not None:
            seq["candidate_ids"] = cands.tolist()
        sequences.append(seq)
    return json.dumps(
        {**req.options.model_dump(), "sequences": sequences}, separators=(",", ":")
    ).encode()


def decode(response: httpx.Response) -> PackedResult:
    if response.status_code >= 300:
        raise parse_error(
            response.status_code, response.content, response.headers.get("retry-after")
        )
    media = response.headers.get("content-type", "")
    if MSGPACK_MEDIA_TYPE in media:
        return decode_result_msgpack(response.content)
    return result_from_json_dict(response.json())


def backoff_delay(config: ClientConfig, attempt: int, retry_after: float | None) -> float:
    """Exponential backoff with jitter; never sooner than the server's Retry-After.

    With Retry-After the wait is Retry-After plus a jitter that grows with the attempt, so
    clients refused together do not all come back in the same instant.
    """
    # (the exponent is capped: a time-bounded retry loop may count far past 2**1024)
    ceiling = min(config.backoff_max_s, config.backoff_base_s * (2 ** min(attempt, 60)))
    if retry_after is not None:
        return retry_after + random.uniform(0, ceiling)
    return random.uniform(ceiling / 2, ceiling)


def merge(parts: list[PackedResult]) -> PackedResult:
    return parts[0] if len(parts) == 1 else PackedResult.concat(parts)


# ---- POST /v1/generate ------------------------------------------------------------------------


def split_generate(req: GenerateRequest, limits: Limits) -> list[GenerateRequest]:
    """Requests of at most max_sequences prompts each. A chunk starting at prompt o carries
    seed + o, so prompt i still samples with seed + i (the server's rule) after the split."""
    if req.n > limits.max_generate_n:
        raise ValueError(f"n={req.n} exceeds the teacher's max_generate_n={limits.max_generate_n}")
    if req.max_tokens > limits.max_generate_tokens:
        raise ValueError(
            f"max_tokens={req.max_tokens} exceeds the teacher's max_generate_tokens="
            f"{limits.max_generate_tokens}"
        )
    items: list[Any] = list(req.prompts or req.prompt_token_ids or [])
    key = "prompts" if req.prompts is not None else "prompt_token_ids"
    step = limits.max_sequences
    if len(items) <= step:
        return [req]
    return [
        req.model_copy(
            update={key: items[o : o + step], "seed": None if req.seed is None else req.seed + o}
        )
        for o in range(0, len(items), step)
    ]


def generate_body(req: GenerateRequest) -> tuple[bytes, dict[str, str]]:
    body = req.model_dump_json(exclude_none=True).encode()
    return body, {"Content-Type": JSON_MEDIA_TYPE, "Accept": JSON_MEDIA_TYPE}


def decode_generate(response: httpx.Response) -> GenerateResponse:
    if response.status_code >= 300:
        raise parse_error(
            response.status_code, response.content, response.headers.get("retry-after")
        )
    return GenerateResponse.model_validate_json(response.content)


def merge_generate(parts: list[GenerateResponse]) -> GenerateResponse:
    if len(parts) == 1:
        return parts[0]
    return GenerateResponse(
        model=parts[0].model,
        results=[r for p in parts for r in p.results],
        usage=GenerateUsage(
            prompts=sum(p.usage.prompts for p in parts),
            prompt_tokens=sum(p.usage.prompt_tokens for p in parts),
            completion_tokens=sum(p.usage.completion_tokens for p in parts),
        ),
    )
