"""verl's teacher call, parsed, and opd's scores laid out as verl's vLLM replica returns them.

verl's teacher loop (`AsyncTeacherLLMServerManager.compute_teacher_logprobs_single`) sends the
whole sequence, prompt and response, with sampling params `{max_tokens: 1, temperature: 1.0,
prompt_logprobs: K, detokenize: False}` and reads `extra_fields["prompt_ids"]` and
`extra_fields["prompt_logprobs"]`: one row per token of the sequence, row j about token j + 1
(the teacher's distribution given x_0 .. x_j), the last row zeros. With K = 0 a row holds the
actual token's id and log-prob; with K > 0 the teacher's top-K ids and log-probs in rank order
(verl.workers.rollout.vllm_rollout.utils.extract_prompt_logprobs). The answer here is the same
layout, from `POST /v1/score` with `score_from = 1`.

The token vLLM would generate (max_tokens: 1; verl throws it away) is the teacher's greedy next
token, as opd's drop-in `/v1/completions` returns it: the sequence goes out with one placeholder
token appended, and the top-1 of the row that predicts it is that token. Nothing the caller
asked for is dropped: sampling options that only shape a generated token (top_p, seed, ...)
are refused, since this replica samples nothing.

Temperature is applied to the teacher's log-probs, as everywhere in opd; verl itself always
asks for 1.0 (vLLM ignores it for prompt log-probs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opd.shared.packed import SequenceScores
from opd.shared.schemas import ScoreRequest, SequenceIn

# Appended when the next token is asked for: any id below the vocabulary size serves, since
# only the teacher's distribution before it is read.
PLACEHOLDER_ID = 0
ACCEPTED = ("max_tokens", "temperature", "prompt_logprobs", "detokenize", "n", "logprobs")


@dataclass(frozen=True)
class TeacherCall:
    """One verl teacher request: the sequence and what verl wants back for it."""

    token_ids: list[int]
    prompt_logprobs: int | None  # None: no rows; 0: the actual token's; K: the teacher's top-K
    next_token: bool  # max_tokens == 1: the greedy next token is returned as token_ids
    temperature: float = 1.0

    @property
    def top_k(self) -> int:
        """top_k of the score request: K, and at least 1 when the next token is asked for."""
        k = self.prompt_logprobs or 0
        return max(k, 1) if self.next_token else k

    @property
    def width(self) -> int:
        """Entries per row in verl's layout (1 for K = 0)."""
        return max(self.prompt_logprobs or 0, 1)


def _int(params: Mapping[str, Any], name: str, default: int | None) -> int | None:
    value = params.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"sampling_params.{name}: must be a whole number >= 0, got {value!r}")
    return value


def parse_call(prompt_ids: Sequence[int], sampling_params: Mapping[str, Any]) -> TeacherCall:
    """verl's arguments, checked: a request this replica cannot answer as asked is refused."""
    unknown = sorted(set(sampling_params) - set(ACCEPTED))
    if unknown:
        raise ValueError(
            f"sampling_params: {unknown} are not taken by opd's verl replica, which scores "
            f"sequences and samples nothing; it takes {list(ACCEPTED)}"
        )
    max_tokens = _int(sampling_params, "max_tokens", 1)
    if max_tokens not in (0, 1):
        raise ValueError(
            f"sampling_params.max_tokens: {max_tokens} > 1; opd's verl replica scores sequences "
            "(the teacher loop asks for 1 token and discards it); generation is POST /v1/generate"
        )
    if _int(sampling_params, "n", 1) != 1:
        raise ValueError(f"sampling_params.n: must be 1, got {sampling_params.get('n')!r}")
    logprobs = _int(sampling_params, "logprobs", None)
    if logprobs not in (None, 0, 1):
        raise ValueError(
            f"sampling_params.logprobs: {logprobs}; only the next token's own log-prob is "
            "returned (logprobs 0 or 1)"
        )
    temperature = sampling_params.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError(f"sampling_params.temperature: must be a number, got {temperature!r}")
    if temperature <= 0:
        raise ValueError(f"sampling_params.temperature: must be > 0, got {temperature!r}")
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids: empty; a teacher call scores a sequence of tokens")
    return TeacherCall(
        token_ids=[int(t) for t in prompt_ids],
        prompt_logprobs=_int(sampling_params, "prompt_logprobs", None),
        next_token=max_tokens == 1,
        temperature=float(temperature),
    )


def score_request(call: TeacherCall) -> ScoreRequest | None:
    """The /v1/score request that answers `call`; None when there is nothing to score."""
    ids = call.token_ids + ([PLACEHOLDER_ID] if call.next_token else [])
    if len(ids) < 2 or (call.prompt_logprobs is None and not call.next_token):
        return None
    return ScoreRequest(
        sequences=[SequenceIn(token_ids=ids, score_from=1)],
        top_k=call.top_k,
        temperature=call.temperature,
    )


@dataclass(frozen=True)
class TeacherAnswer:
    """The fields of verl's TokenOutput, as plain Python data."""

    token_ids: list[int]
    log_probs: list[float] | None
    extra_fields: dict[str, Any]


def verl_answer(call: TeacherCall, scores: SequenceScores | None) -> TeacherAnswer:
    """verl's rows from opd's scores of score_request(call) (None when it was None)."""
    n_rows = len(call.token_ids) - 1  # rows about tokens 1 .. L-1
    token_ids: list[int] = []
    log_probs: list[float] | None = None
    if call.next_token:
        assert scores is not None and scores.top_k_ids is not None
        assert scores.top_k_logprobs is not None
        token_ids = [int(scores.top_k_ids[n_rows, 0])]
        log_probs = [float(scores.top_k_logprobs[n_rows, 0])]
    extra: dict[str, Any] = {}
    if call.prompt_logprobs is not None:
        k = call.prompt_logprobs
        if n_rows == 0:
            ids_rows: list[list[int]] = []
            logp_rows: list[list[float]] = []
        elif k == 0:
            assert scores is not None
            ids_rows = [[t] for t in call.token_ids[1:]]
            logp_rows = [[v] for v in scores.token_logprobs[:n_rows].tolist()]
        else:
            assert scores is not None and scores.top_k_ids is not None
            assert scores.top_k_logprobs is not None
            ids_rows = scores.top_k_ids[:n_rows, :k].tolist()
            logp_rows = scores.top_k_logprobs[:n_rows, :k].tolist()
        extra["prompt_ids"] = [*ids_rows, [0] * call.width]
        extra["prompt_logprobs"] = [*logp_rows, [0.0] * call.width]
    return TeacherAnswer(token_ids=token_ids, log_probs=log_probs, extra_fields=extra)
