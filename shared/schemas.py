"""Wire models of the JSON encoding, and the request model clients hand to TeacherClient.

Positions: a sequence holds prompt + completion token ids `x_0 .. x_{L-1}`. With
`score_from = s` (1 <= s <= L-1), the service scores tokens `x_s .. x_{L-1}`, each given the
tokens before it: row `i` of every per-position array is about token `x_{s+i}` and the teacher
distribution q(. | x_{<s+i}). `n_scored = L - s`. Tokens before `s` are context only.

Scored spans (protocol 1.3): instead of `score_from`, a sequence may name `score_spans`, sorted
non-overlapping half-open ranges `[start, end)` with 1 <= start < end <= L (touching allowed).
Its scored positions are range(start, end) of each span, in order; row `i` is about the i-th of
them, p_i, given x_{<p_i}. Positions outside the spans are context only (they go through the
decoder, never through the LM head). `score_from = s` is exactly `score_spans = [[s, L]]`.
Exactly one of the two is given per sequence (opd.shared.packed checks it).

All models share one base with extra="forbid" so a misspelt option is an error, never ignored.
Bounds that depend on the server's configuration (lengths, top_k, ...) are checked by
opd.shared.validation against `Limits`; the static ones sit in `Field` so OpenAPI shows them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from opd.shared.limits import Limits
from opd.shared.version import PROTOCOL_VERSION

LogprobDType = Literal["float32", "float16"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _pair(value: Any) -> Any:
    """A JSON array [start, end] as the tuple the strict schema wants (JSON has no tuples)."""
    return tuple(value) if isinstance(value, list) else value


# A half-open range [start, end) of scored token positions.
Span = Annotated[tuple[int, int], BeforeValidator(_pair)]


class SequenceIn(_Wire):
    token_ids: list[int] = Field(description="prompt + completion token ids")
    score_from: int | None = Field(
        default=None,
        description="index of the first scored token; earlier tokens are context only. "
        "Exactly one of score_from and score_spans is given.",
        ge=1,
    )
    score_spans: list[Span] | None = Field(
        default=None,
        min_length=1,
        description="scored ranges [start, end) of token positions, sorted, non-overlapping, "
        "1 <= start < end <= len(token_ids); rows come back for range(start, end) of each span "
        "in order, other positions are context only. score_from=s is score_spans=[[s, L]].",
    )
    candidate_ids: list[list[int]] | None = Field(
        default=None,
        description="[n_scored, k] ids per scored position (e.g. the student's top-k); the "
        "service returns the teacher log-prob at exactly these ids. Same k for every sequence.",
    )


class ScoreOptions(_Wire):
    top_k: int = Field(default=0, ge=0, description="teacher top-k ids + log-probs; 0 = none")
    entropy: bool = Field(default=False, description="exact full-vocabulary teacher entropy")
    token_rank: bool = Field(
        default=False,
        description="vocabulary rank of the actual token (1 = the teacher's top choice; ties "
        "count against it, as vLLM ranks)",
    )
    temperature: float = Field(
        default=1.0, gt=0, description="log-probs of softmax(logits / temperature)"
    )
    logprob_dtype: LogprobDType = Field(
        default="float32", description="float type of returned log-probs and entropies"
    )


class ScoreRequest(ScoreOptions):
    """POST /v1/score body (JSON), and what TeacherClient.score takes."""

    sequences: list[SequenceIn] = Field(min_length=1, description="the sequences to score")


class SequenceScoresJSON(_Wire):
    token_logprobs: list[float] = Field(description="[n_scored] log q(actual token)")
    candidate_logprobs: list[list[float]] | None = Field(
        default=None, description="[n_scored, k] log q at the submitted candidate ids"
    )
    top_k_ids: list[list[int]] | None = Field(default=None, description="[n_scored, top_k]")
    top_k_logprobs: list[list[float]] | None = Field(default=None, description="[n_scored, top_k]")
    entropy: list[float] | None = Field(default=None, description="[n_scored] nats")
    token_ranks: list[int] | None = Field(
        default=None, description="[n_scored] rank of the actual token, 1 = top"
    )


class Usage(_Wire):
    sequences: int
    input_tokens: int = Field(description="tokens submitted, context included")
    scored_tokens: int = Field(description="positions scored")


class ScoreResponseJSON(_Wire):
    """POST /v1/score answer in the JSON encoding."""

    protocol_version: str = PROTOCOL_VERSION
    model: str
    temperature: float
    logprob_dtype: LogprobDType
    top_k: int
    n_candidates: int
    results: list[SequenceScoresJSON]
    usage: Usage


class ModelInfo(_Wire):
    """GET /v1/model: what the teacher is, so a client can check it before any training."""

    name: str
    revision: str = Field(description="model revision or content hash of its weights")
    backend: str
    vocab_size: int = Field(description="rows of the LM head: valid token ids are [0, vocab_size)")
    max_model_len: int
    dtype: str
    protocol_version: str = PROTOCOL_VERSION
    tokenizer_fingerprint: str = Field(
        description="sha256 of vocab, special tokens and chat template (opd.shared.fingerprint)"
    )
    limits: Limits


class TokenizerFiles(_Wire):
    """GET /v1/tokenizer: the teacher's tokenizer as the text files transformers saves
    (tokenizer.json, tokenizer_config.json, ...), so a student of another family can render
    and tokenize its text as the teacher does (cross-tokenizer OPD). Text only: no pickle."""

    protocol_version: str = PROTOCOL_VERSION
    tokenizer_fingerprint: str = Field(description="as in GET /v1/model")
    files: dict[str, str] = Field(description="file name -> its text")


# ---- POST /v1/generate ------------------------------------------------------------------------


class GenerateOptions(_Wire):
    """How the teacher samples. Defaults are the model's plain distribution (no top-k cut)."""

    max_tokens: int = Field(default=256, ge=1, description="new tokens per completion, at most")
    temperature: float = Field(default=1.0, ge=0, description="0 = greedy decoding")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling mass")
    n: int = Field(default=1, ge=1, description="completions per prompt")
    seed: int | None = Field(
        default=None,
        ge=0,
        le=2**62,
        description="prompt i samples with seed + i, so a result does not depend on how prompts "
        "were batched; unset = not reproducible",
    )


class GenerateRequest(GenerateOptions):
    """POST /v1/generate body (JSON): teacher completions for prompts.

    Exactly one of `prompts` (user messages, rendered with the teacher's chat template, as
    opd.shared.chat does) or `prompt_token_ids` (sent as they are) must be given."""

    prompts: list[str] | None = Field(
        default=None, min_length=1, description="user messages, rendered with the chat template"
    )
    prompt_token_ids: list[list[int]] | None = Field(
        default=None, min_length=1, description="prompts as token ids, used as they are"
    )

    @property
    def n_prompts(self) -> int:
        return len(self.prompts or self.prompt_token_ids or [])


FinishReason = Literal["stop", "length"]


class GeneratedCompletion(_Wire):
    text: str = Field(description="decoded completion, special tokens removed")
    token_ids: list[int] = Field(description="completion ids, up to and including the EOS")
    finish_reason: FinishReason = Field(description="stop: EOS; length: max_tokens reached")


class GenerateResult(_Wire):
    prompt_token_ids: list[int] = Field(description="the prompt as the teacher saw it")
    completions: list[GeneratedCompletion] = Field(description="n completions")


class GenerateUsage(_Wire):
    prompts: int
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(_Wire):
    """POST /v1/generate answer (JSON): one result per prompt, in request order."""

    protocol_version: str = PROTOCOL_VERSION
    model: str
    results: list[GenerateResult]
    usage: GenerateUsage
