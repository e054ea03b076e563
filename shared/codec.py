"""The two encodings of /v1/score: JSON (for curl and humans) and msgpack with raw arrays.

Binary form (Content-Type / Accept: application/vnd.opd+msgpack): one msgpack map whose array
fields are msgpack `bin` values holding raw little-endian C-order arrays; their dtypes are fixed
by the protocol (below) or named by a sibling key. A ragged batch is a flat array plus offsets.

Request map::

    protocol_version str, top_k int, entropy bool, token_rank bool, temperature float,
    logprob_dtype str, token_ids bin <i4 [T], seq_offsets bin <i8 [n+1], score_from bin <i4 [n],
    n_candidates int, candidate_ids bin <i4 [N*K] or nil,
    (1.3, optional, both or neither) span_offsets bin <i8 [n+1], spans bin <i4 [S*2]

With spans, sequence i is scored at range(start, end) of its spans
spans[span_offsets[i]:span_offsets[i+1]] (flattened start, end pairs), and score_from[i] must
equal its first span's start: the decoder keeps score_from as sent and validation refuses a
mismatch (422 naming sequences[i].score_from), it never derives one from the other. The encoder
writes the two span keys only for a request with spans, so a request without spans is byte for
byte what a 1.2 client sends, and a 1.2 server refuses spans (unknown field) instead of
scoring the wrong positions.

Response map::

    protocol_version, model, temperature, logprob_dtype ("float32" | "float16"), top_k,
    n_candidates, ids_dtype ("uint16" | "int32"), usage {sequences, input_tokens, scored_tokens},
    scored_offsets bin <i8 [n+1], token_logprobs bin [N], candidate_logprobs bin [N*K] or nil,
    top_k_ids bin ids_dtype [N*k] or nil, top_k_logprobs bin [N*k] or nil, entropy bin [N] or nil,
    token_ranks bin <i4 [N] or nil

msgpack is used only as an envelope of typed scalars and byte strings: no extension types, no
pickle, nothing executable. Decoding checks every length before reshaping; a body that does not
decode is a ContractError with status 400.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import msgpack
import numpy as np
from pydantic import BaseModel, ValidationError

from opd.shared.errors import ContractError
from opd.shared.packed import PackedRequest, PackedResult
from opd.shared.schemas import ScoreOptions, ScoreRequest
from opd.shared.version import PROTOCOL_MAJOR, PROTOCOL_VERSION

try:  # the server's extra installs orjson; a client-only install decodes with the stdlib
    import orjson
except ImportError:  # pragma: no cover - exercised only without the server extra
    orjson = None  # type: ignore[assignment]

M = TypeVar("M", bound=BaseModel)

# Nesting a valid request never needs: sequences -> sequence -> candidate_ids -> row is depth 4.
# orjson stops at 1024 levels; the stdlib parser at the recursion limit (also ~1000).
_LE = {"int32": "<i4", "int64": "<i8", "uint16": "<u2", "float32": "<f4", "float16": "<f2"}


def _malformed(message: str, field: str | None = None) -> ContractError:
    return ContractError(message, field=field, status=400, kind="malformed_body")


def _to_bin(x: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(x, dtype=_LE[dtype]).tobytes()


def _from_bin(obj: dict[str, Any], key: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    raw = obj.get(key)
    if not isinstance(raw, bytes | bytearray):
        raise _malformed(f"{key} must be a msgpack bin of {dtype}", field=key)
    itemsize = np.dtype(_LE[dtype]).itemsize
    expected = int(np.prod(shape)) * itemsize if shape else None
    if len(raw) % itemsize:
        raise _malformed(
            f"{key} holds {len(raw)} bytes, not a multiple of {itemsize} ({dtype})", field=key
        )
    if expected is not None and len(raw) != expected:
        raise _malformed(
            f"{key} holds {len(raw)} bytes; expected {expected} ({dtype} {list(shape)})",
            field=key,
        )
    arr = np.frombuffer(raw, dtype=_LE[dtype])
    # A writable native-endian copy: the rest of the code (and torch) wants ordinary arrays.
    return arr.astype(arr.dtype.newbyteorder("="), copy=True).reshape(shape or (-1,))


def _unpack(body: bytes, *, require_version: bool) -> dict[str, Any]:
    """The top-level map of a msgpack body. A request must name its protocol_version (a string);
    a response without one is read as this side's version (older servers omitted nothing, but
    a reader stays lenient about what it reads back)."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise _malformed(f"body is not valid msgpack: {exc}", field="body") from None
    if not isinstance(obj, dict):
        raise _malformed(f"msgpack body must be a map, not {type(obj).__name__}", field="body")
    version = obj.get("protocol_version", None if require_version else PROTOCOL_VERSION)
    if version is None:
        raise ContractError(
            f"protocol_version is required (this side speaks {PROTOCOL_VERSION})",
            field="protocol_version",
            limit=PROTOCOL_VERSION,
        )
    if not isinstance(version, str):
        raise ContractError(
            f"protocol_version must be a string such as {PROTOCOL_VERSION!r}, "
            f"not {type(version).__name__}",
            field="protocol_version",
            limit=PROTOCOL_VERSION,
        )
    major = version.split(".")[0]
    if major != PROTOCOL_MAJOR:
        raise ContractError(
            f"protocol_version {obj.get('protocol_version')} is not supported; this side speaks "
            f"{PROTOCOL_VERSION}",
            field="protocol_version",
            limit=PROTOCOL_VERSION,
        )
    return obj


# ---- requests --------------------------------------------------------------------------------


def encode_request_msgpack(req: PackedRequest) -> bytes:
    o = req.options
    spans: dict[str, bytes] = {}
    if req.spans_S2 is not None and req.span_offsets_n1 is not None:
        spans = {
            "span_offsets": _to_bin(req.span_offsets_n1, "int64"),
            "spans": _to_bin(req.spans_S2.reshape(-1), "int32"),
        }
    return msgpack.packb(
        {
            "protocol_version": PROTOCOL_VERSION,
            "top_k": o.top_k,
            "entropy": o.entropy,
            "token_rank": o.token_rank,
            "temperature": o.temperature,
            "logprob_dtype": o.logprob_dtype,
            "token_ids": _to_bin(req.token_ids_T, "int32"),
            "seq_offsets": _to_bin(req.seq_offsets_n1, "int64"),
            "score_from": _to_bin(req.score_from_n, "int32"),
            "n_candidates": req.n_candidates,
            "candidate_ids": None
            if req.candidate_ids_NK is None
            else _to_bin(req.candidate_ids_NK, "int32"),
            **spans,
        },
        use_bin_type=True,
    )


_REQUEST_KEYS = {
    "protocol_version",
    "top_k",
    "entropy",
    "token_rank",
    "temperature",
    "logprob_dtype",
    "token_ids",
    "seq_offsets",
    "score_from",
    "n_candidates",
    "candidate_ids",
    "span_offsets",
    "spans",
}


_OPTION_KEYS = ("top_k", "entropy", "token_rank", "temperature", "logprob_dtype")


def decode_request_msgpack(body: bytes) -> PackedRequest:
    """A msgpack score request, with the same strict types as the JSON one (a bool is not an
    int, a string is not a number)."""
    obj = _unpack(body, require_version=True)
    unknown = sorted(
        repr(k) if not isinstance(k, str) or not k else k for k in obj if k not in _REQUEST_KEYS
    )
    if unknown:
        raise ContractError(f"unknown fields {unknown}", field=unknown[0])
    for key in ("token_ids", "seq_offsets", "score_from"):
        if key not in obj:
            raise ContractError(f"{key} is required", field=key)
    options = validate_wire(ScoreOptions, {k: obj[k] for k in _OPTION_KEYS if k in obj})
    tokens = _from_bin(obj, "token_ids", "int32", ())
    offsets = _from_bin(obj, "seq_offsets", "int64", ())
    score_from = _from_bin(obj, "score_from", "int32", ()).astype(np.int64)
    n_cands = obj.get("n_candidates", 0)
    # bool is an int subclass: refuse it too; past int32 no candidate matrix can be that wide
    # (and numpy's reshape of an empty one would fail with a ValueError, a 500)
    if type(n_cands) is not int or not 0 <= n_cands < 2**31:
        raise ContractError(
            f"n_candidates must be a non-negative int32, not {n_cands!r}",
            field="n_candidates",
            limit=2**31 - 1,
        )
    candidates = None
    if obj.get("candidate_ids") is not None:
        if n_cands < 1:
            raise ContractError("candidate_ids given with n_candidates=0", field="n_candidates")
        flat = _from_bin(obj, "candidate_ids", "int32", ())
        if flat.size % n_cands:
            raise ContractError(
                f"candidate_ids holds {flat.size} ids, not a multiple of n_candidates={n_cands}",
                field="candidate_ids",
                limit=n_cands,
            )
        candidates = flat.reshape(-1, n_cands)
    if len(offsets) < 1:
        raise ContractError("seq_offsets needs n+1 entries", field="seq_offsets")
    span_offsets, spans = _decode_spans(obj)
    return PackedRequest(
        token_ids_T=tokens,
        seq_offsets_n1=offsets,
        score_from_n=score_from,
        candidate_ids_NK=candidates,
        options=options,
        span_offsets_n1=span_offsets,
        spans_S2=spans,
    )


def _decode_spans(obj: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """span_offsets and spans (protocol 1.3): both or neither; nil is the same as absent.
    Their content (ranges, order, score_from) is checked by opd.shared.validation."""
    given = [key for key in ("span_offsets", "spans") if obj.get(key) is not None]
    if not given:
        return None, None
    if len(given) == 1:
        missing = "spans" if given == ["span_offsets"] else "span_offsets"
        raise ContractError(f"{missing} is required with {given[0]}", field=missing)
    span_offsets = _from_bin(obj, "span_offsets", "int64", ())
    flat = _from_bin(obj, "spans", "int32", ())
    if flat.size % 2:
        raise ContractError(
            f"spans holds {flat.size} numbers; it must be start, end pairs (an even count)",
            field="spans",
            limit=2,
        )
    return span_offsets, flat.astype(np.int64).reshape(-1, 2)


def decode_request_json(body: bytes) -> PackedRequest:
    return PackedRequest.from_request(validate_wire(ScoreRequest, json_object(body)))


def json_object(body: bytes) -> dict[str, Any]:
    """A JSON body that must be an object, with bounded nesting and number sizes.

    Malformed JSON, nesting deeper than ~1,000 levels, integers beyond 64 bits (orjson) or
    beyond Python's 4,300-digit int-string limit (stdlib), and bodies that are an array, a
    string, a number or null are all a 400 naming `body`."""
    try:
        obj = orjson.loads(body) if orjson is not None else json.loads(body)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        # orjson.JSONDecodeError and json.JSONDecodeError are ValueErrors; so is the stdlib's
        # "Exceeds the limit (4300 digits) for integer string conversion".
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise _malformed(f"body is not valid JSON: {reason}", field="body") from None
    if not isinstance(obj, dict):
        kind = "null" if obj is None else type(obj).__name__
        raise _malformed(f"body must be a JSON object, not {kind}", field="body")
    return obj


def validate_wire(model: type[M], obj: dict[str, Any], status: int = 422) -> M:
    """`obj` as `model`, in pydantic's strict mode: what a client sent is taken as typed, so
    "4" is not 4 and true is not 1 (as unknown fields are refused, not ignored). An int is
    still a valid float. A failure is a ContractError naming the field."""
    try:
        return model.model_validate(obj, strict=True)
    except ValidationError as exc:
        err = contract_error_from_pydantic(exc)
        err.status = status
        raise err from None


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "function-after"}


def _is_union_tag(loc: str) -> bool:
    """pydantic names the union member it tried in the error path (`list[int]`, `str`)."""
    return "[" in loc or loc in _TYPE_TAGS


def contract_error_from_pydantic(exc: ValidationError) -> ContractError:
    """The first pydantic error as a ContractError whose field is a readable path."""
    err = exc.errors()[0]
    parts: list[str] = []
    for loc in err["loc"]:
        if isinstance(loc, str) and _is_union_tag(loc):
            continue  # "prompt.list[int][1]" -> "prompt[1]": the member tried is not a field
        if isinstance(loc, int):
            parts[-1:] = [f"{parts[-1]}[{loc}]"] if parts else [f"[{loc}]"]
        else:
            parts.append(str(loc))
    path = ".".join(p if p else '""' for p in parts) if parts else "body"
    limit = None
    ctx = err.get("ctx") or {}
    for key in ("le", "ge", "lt", "gt", "min_length", "max_length", "expected"):
        if key in ctx:
            limit = ctx[key]
            break
    if limit is not None and not isinstance(limit, int | float | str):
        limit = str(limit)
    return ContractError(f"{path}: {err['msg']}", field=path, limit=limit)


# ---- responses -------------------------------------------------------------------------------


def _usage(res: PackedResult) -> dict[str, int]:
    return {
        "sequences": res.n_sequences,
        "input_tokens": int(res.input_tokens),
        "scored_tokens": int(res.scored_offsets_n1[-1]),
    }


def encode_result_msgpack(res: PackedResult) -> bytes:
    fdt = res.logprob_dtype
    ids = res.top_k_ids_Nk
    ids_dtype = "uint16" if ids is None or ids.size == 0 or int(ids.max()) < 65536 else "int32"
    top_k = 0 if ids is None else int(ids.shape[1])
    n_cands = 0 if res.candidate_logprobs_NK is None else int(res.candidate_logprobs_NK.shape[1])

    def opt(x: np.ndarray | None, dtype: str) -> bytes | None:
        return None if x is None else _to_bin(x, dtype)

    return msgpack.packb(
        {
            "protocol_version": res.protocol_version,
            "model": res.model,
            "temperature": res.temperature,
            "logprob_dtype": fdt,
            "top_k": top_k,
            "n_candidates": n_cands,
            "ids_dtype": ids_dtype,
            "usage": _usage(res),
            "scored_offsets": _to_bin(res.scored_offsets_n1, "int64"),
            "token_logprobs": _to_bin(res.token_logprobs_N, fdt),
            "candidate_logprobs": opt(res.candidate_logprobs_NK, fdt),
            "top_k_ids": opt(ids, ids_dtype),
            "top_k_logprobs": opt(res.top_k_logprobs_Nk, fdt),
            "entropy": opt(res.entropy_N, fdt),
            "token_ranks": opt(res.token_ranks_N, "int32"),
        },
        use_bin_type=True,
    )


def decode_result_msgpack(body: bytes) -> PackedResult:
    obj = _unpack(body, require_version=False)
    try:
        return _result_from_map(obj)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        if isinstance(exc, ContractError):
            raise
        raise _malformed(f"response map is malformed: {exc!r}") from None


def _result_from_map(obj: dict[str, Any]) -> PackedResult:
    fdt = obj.get("logprob_dtype")
    ids_dtype = obj.get("ids_dtype", "int32")
    if fdt not in ("float32", "float16"):
        raise _malformed(f"logprob_dtype {fdt!r} not understood", field="logprob_dtype")
    if ids_dtype not in ("uint16", "int32"):
        raise _malformed(f"ids_dtype {ids_dtype!r} not understood", field="ids_dtype")
    offsets = _from_bin(obj, "scored_offsets", "int64", ())
    if len(offsets) < 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise _malformed(
            "scored_offsets must start at 0 and never decrease", field="scored_offsets"
        )
    n_scored = int(offsets[-1]) if len(offsets) else 0
    top_k, n_cands = int(obj.get("top_k", 0)), int(obj.get("n_candidates", 0))

    def opt(key: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray | None:
        return None if obj.get(key) is None else _from_bin(obj, key, dtype, shape)

    ids = opt("top_k_ids", ids_dtype, (n_scored, top_k))
    return PackedResult(
        scored_offsets_n1=offsets,
        token_logprobs_N=_from_bin(obj, "token_logprobs", fdt, (n_scored,)),
        candidate_logprobs_NK=opt("candidate_logprobs", fdt, (n_scored, n_cands)),
        top_k_ids_Nk=None if ids is None else ids.astype(np.int32),
        top_k_logprobs_Nk=opt("top_k_logprobs", fdt, (n_scored, top_k)),
        entropy_N=opt("entropy", fdt, (n_scored,)),
        token_ranks_N=opt("token_ranks", "int32", (n_scored,)),
        model=str(obj.get("model", "")),
        temperature=float(obj.get("temperature", 1.0)),
        logprob_dtype=fdt,
        protocol_version=str(obj.get("protocol_version", PROTOCOL_VERSION)),
        input_tokens=int((obj.get("usage") or {}).get("input_tokens", 0)),
    )


def result_to_json_dict(res: PackedResult, keep_arrays: bool = False) -> dict[str, Any]:
    """The JSON response (schema: ScoreResponseJSON), built from arrays without pydantic.

    keep_arrays=True leaves numpy slices in place for a serializer that writes them directly
    (orjson on the server: float32 in shortest form, far faster than lists of Python floats).
    """

    def rows(x: np.ndarray | None, a: int, b: int) -> Any:
        if x is None:
            return None
        return x[a:b] if keep_arrays else x[a:b].tolist()

    # float16 values are widened for JSON; their digits still carry float16 precision.
    widened = res.cast("float32") if res.logprob_dtype == "float16" else res
    offs = res.scored_offsets_n1
    results = []
    for i in range(res.n_sequences):
        a, b = int(offs[i]), int(offs[i + 1])
        results.append(
            {
                "token_logprobs": rows(widened.token_logprobs_N, a, b),
                "candidate_logprobs": rows(widened.candidate_logprobs_NK, a, b),
                "top_k_ids": rows(res.top_k_ids_Nk, a, b),
                "top_k_logprobs": rows(widened.top_k_logprobs_Nk, a, b),
                "entropy": rows(widened.entropy_N, a, b),
                "token_ranks": rows(res.token_ranks_N, a, b),
            }
        )
    return {
        "protocol_version": res.protocol_version,
        "model": res.model,
        "temperature": res.temperature,
        "logprob_dtype": res.logprob_dtype,
        "top_k": 0 if res.top_k_ids_Nk is None else int(res.top_k_ids_Nk.shape[1]),
        "n_candidates": 0
        if res.candidate_logprobs_NK is None
        else int(res.candidate_logprobs_NK.shape[1]),
        "results": results,
        "usage": _usage(res),
    }


def result_from_json_dict(data: dict[str, Any]) -> PackedResult:
    """Inverse of result_to_json_dict (the client's JSON mode)."""
    results = data["results"]
    fdt = np.float32 if data.get("logprob_dtype", "float32") == "float32" else np.float16
    lengths = np.array([len(r["token_logprobs"]) for r in results], dtype=np.int64)
    offsets = np.zeros(len(results) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    k, nc = int(data.get("top_k", 0)), int(data.get("n_candidates", 0))

    def cat(key: str, width: int | None, dtype: Any) -> np.ndarray | None:
        if not results or results[0].get(key) is None:
            return None
        parts = [np.asarray(r[key], dtype=dtype) for r in results]
        if width is not None:
            parts = [p.reshape(-1, width) for p in parts]
        return np.concatenate(parts)

    return PackedResult(
        scored_offsets_n1=offsets,
        token_logprobs_N=cat("token_logprobs", None, fdt),
        candidate_logprobs_NK=cat("candidate_logprobs", nc, fdt),
        top_k_ids_Nk=cat("top_k_ids", k, np.int32),
        top_k_logprobs_Nk=cat("top_k_logprobs", k, fdt),
        entropy_N=cat("entropy", None, fdt),
        token_ranks_N=cat("token_ranks", None, np.int32),
        model=str(data.get("model", "")),
        temperature=float(data.get("temperature", 1.0)),
        logprob_dtype=str(data.get("logprob_dtype", "float32")),
        protocol_version=str(data.get("protocol_version", PROTOCOL_VERSION)),
        input_tokens=int(data.get("usage", {}).get("input_tokens", 0)),
    )
