"""Hostile request bodies for every POST route: hypothesis strategies and a status tally.

Three kinds of mutation start from one valid body per route (SEEDS):
- structural: any leaf replaced by any JSON value (huge, negative, wrong type, nested), keys
  dropped or added (including "" and non-ASCII ones);
- msgpack: the binary /v1/score envelope with fields replaced by wrong types, NaN/inf floats,
  64-bit extremes, random `bin` blobs, extension types and nested maps;
- bytes: the valid JSON or msgpack body with bytes flipped, inserted, deleted or cut off.

`Tally` counts the statuses a run saw; with OPD_FUZZ_REPORT=path the fuzz tests write it there
(the figures in docs/reliability.md). OPD_FUZZ_EXAMPLES scales the number of cases.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from hypothesis import strategies as st

from opd.shared.version import PROTOCOL_VERSION

# Token ids < 49,152 (the tiny test model's vocabulary); sequences short enough for small limits.
_TOKENS = [5, 17, 250, 31, 9, 77, 120, 4]

SEEDS: dict[str, dict[str, Any]] = {
    "/v1/score": {
        "sequences": [
            {"token_ids": _TOKENS, "score_from": 3},
            {"token_ids": _TOKENS[:5], "score_from": 1, "candidate_ids": None},
        ],
        "top_k": 2,
        "entropy": True,
        "token_rank": True,
        "temperature": 0.9,
        "logprob_dtype": "float32",
    },
    "/v1/generate": {
        "prompt_token_ids": [_TOKENS[:4]],
        "max_tokens": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "n": 2,
        "seed": 3,
    },
    "/v1/completions": {
        "model": "strict-teacher",
        "prompt": _TOKENS,
        "max_tokens": 1,
        "temperature": 1.0,
        "prompt_logprobs": 2,
        "logprobs": 1,
    },
    "/inference/v1/generate": {
        "token_ids": _TOKENS,
        "sampling_params": {
            "max_tokens": 1,
            "temperature": 1.0,
            "prompt_logprobs": 1,
            # vLLM's rule: a row per prompt position that has a log-prob (all but the first)
            "prompt_logprob_token_ids": [[4, 5]] * (len(_TOKENS) - 1),
        },
    },
    "/generate": {
        "input_ids": _TOKENS,
        "sampling_params": {"temperature": 1.0, "max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 2,
    },
    "/get_sequence_logprobs/": {
        "sequences": [_TOKENS, _TOKENS[:6]],
        "prompt_lengths": [3, 2],
        "top_logprobs": 2,
        "temperature": 0.8,
        "response_format": "json",
    },
}

ROUTES = tuple(SEEDS)

# Values that have broken JSON servers: 64-bit edges, floats at the ends of the range, bools
# where ints go, deep-ish nesting, empty and odd strings.
_EDGE_INTS = [0, 1, -1, 2**31 - 1, 2**31, -(2**31) - 1, 2**63 - 1, -(2**63), 2**64 - 1]
_EDGE_FLOATS = [0.0, -0.0, 5e-324, 1e-300, 1e308, -1e308, 0.5, 1e-3, 100.0, 1e6]

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(_EDGE_INTS),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from(_EDGE_FLOATS),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "1", "4", "2.0", "true", "null", "float16", "\x00", "é" * 3]),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _mutate_json(draw: st.DrawFn, value: Any, depth: int = 0) -> Any:
    """One structural mutation somewhere in `value`, or recursion into a child."""
    choice = draw(st.integers(0, 9))
    if choice == 0 or depth > 6:
        return draw(json_values)
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        out = dict(value)
        if choice == 1:
            del out[key]
        elif choice == 2:
            out[draw(st.sampled_from(["", "unknown", "ü", "sequences ", key.upper()]))] = draw(
                json_values
            )
        else:
            out[key] = _mutate_json(draw, value[key], depth + 1)
        return out
    if isinstance(value, list) and value:
        out_list = list(value)
        i = draw(st.integers(0, len(value) - 1))
        if choice == 1:
            del out_list[i]
        elif choice == 2:
            out_list.insert(i, draw(json_values))
        elif choice == 3:
            out_list = out_list * draw(st.integers(2, 40))  # longer than the limits allow
        else:
            out_list[i] = _mutate_json(draw, value[i], depth + 1)
        return out_list
    return draw(json_values)


@st.composite
def mutated_json(draw: st.DrawFn, route: str) -> bytes:
    """A structurally mutated JSON body for `route` (1-3 mutations of its seed)."""
    body: Any = SEEDS[route]
    for _ in range(draw(st.integers(1, 3))):
        body = _mutate_json(draw, body)
    return json.dumps(body, allow_nan=False).encode()


def _bin(values: list[int], dtype: str) -> bytes:
    return np.asarray(values, dtype=dtype).tobytes()


def valid_msgpack_score() -> dict[str, Any]:
    """The msgpack twin of SEEDS["/v1/score"] (two sequences, top_k 2)."""
    return {
        "protocol_version": PROTOCOL_VERSION,
        "top_k": 2,
        "entropy": True,
        "token_rank": False,
        "temperature": 1.0,
        "logprob_dtype": "float16",
        "token_ids": _bin(_TOKENS + _TOKENS[:5], "<i4"),
        "seq_offsets": _bin([0, 8, 13], "<i8"),
        "score_from": _bin([3, 1], "<i4"),
        "n_candidates": 2,
        "candidate_ids": _bin([1, 2] * 9, "<i4"),
    }


msgpack_leaves = st.one_of(
    json_leaves,
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.binary(max_size=64),
    st.builds(lambda b: _bin(b, "<i4"), st.lists(st.integers(-(2**31), 2**31 - 1), max_size=20)),
    st.builds(lambda b: _bin(b, "<i8"), st.lists(st.integers(-(2**63), 2**63 - 1), max_size=6)),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    st.dictionaries(st.text(max_size=4), st.integers(-(2**63), 2**64 - 1), max_size=3),
    st.lists(st.integers(-(2**63), 2**64 - 1), max_size=4),
)


@st.composite
def mutated_msgpack(draw: st.DrawFn) -> bytes:
    """A msgpack /v1/score body with 1-3 fields replaced, dropped or added."""
    body = valid_msgpack_score()
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.integers(0, 3))
        key = draw(st.sampled_from(sorted(body) or ["token_ids"]))
        if action == 0:
            body.pop(key, None)
        elif action == 1:
            body[draw(st.sampled_from(["", "extra", key + "_"]))] = draw(msgpack_leaves)
        else:
            body[key] = draw(msgpack_leaves)
    return msgpack.packb(body, use_bin_type=True)


@st.composite
def mutated_bytes(draw: st.DrawFn, valid: bytes) -> bytes:
    """`valid` with 1-4 byte-level edits: flips, inserts, deletes, a cut, or a repeat."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 4))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == 0 and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == 2 and data:
            del data[i : i + draw(st.integers(1, 8))]
        elif op == 3:
            del data[i:]
        else:
            data[i:i] = bytes(data[i : i + 16]) * draw(st.integers(1, 50))
    return bytes(data)


def valid_json(route: str) -> bytes:
    return json.dumps(SEEDS[route]).encode()


def examples(default: int) -> int:
    """The number of cases per test: `default`, scaled by OPD_FUZZ_EXAMPLES (a multiplier)."""
    return max(1, int(default * float(os.environ.get("OPD_FUZZ_EXAMPLES", "1"))))


class Tally:
    """Statuses seen, per route and kind of mutation; thread-safe, written on demand."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, Counter[int]] = {}

    def add(self, key: str, status: int) -> None:
        with self._lock:
            self.counts.setdefault(key, Counter())[status] += 1

    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def server_errors(self) -> int:
        return sum(n for c in self.counts.values() for s, n in c.items() if s >= 500)

    def write(self, path: Path) -> None:
        table = {k: dict(sorted(c.items())) for k, c in sorted(self.counts.items())}
        existing = json.loads(path.read_text()) if path.exists() else {}
        for key, statuses in table.items():
            merged = Counter({int(s): n for s, n in existing.get(key, {}).items()})
            merged.update(statuses)
            existing[key] = {str(s): n for s, n in sorted(merged.items())}
        path.write_text(json.dumps(existing, indent=1, sort_keys=True))
