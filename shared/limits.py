"""Limits of one score request: the one definition the server refuses by and the client splits by.

The server reports its effective limits in GET /v1/model; the client reads them there and cuts a
large batch into requests that respect every one, so a well-behaved client is never refused.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_sequences: int = Field(default=256, ge=1, description="sequences per request")
    max_tokens_per_sequence: int = Field(
        default=8192,
        ge=2,
        description="tokens per sequence (prompt + completion); <= model context",
    )
    max_total_tokens: int = Field(default=65536, ge=2, description="tokens summed over a request")
    max_top_k: int = Field(default=64, ge=0, description="largest teacher top_k")
    max_candidates: int = Field(default=64, ge=0, description="largest candidate ids per position")
    max_body_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="largest request body in bytes"
    )
    min_temperature: float = Field(default=1e-3, gt=0, description="smallest temperature")
    max_temperature: float = Field(default=100.0, gt=0, description="largest temperature")
    # POST /v1/generate: prompts per request are bounded by max_sequences, prompt + completion by
    # max_tokens_per_sequence; these two bound the work one generate request may ask for.
    max_generate_n: int = Field(default=16, ge=1, description="completions per prompt")
    max_generate_tokens: int = Field(
        default=4096, ge=1, description="largest max_tokens of a generate request"
    )

    def clamp_to_context(self, max_model_len: int) -> Limits:
        """The same limits with max_tokens_per_sequence no larger than the model's context."""
        if self.max_tokens_per_sequence <= max_model_len:
            return self
        return self.model_copy(update={"max_tokens_per_sequence": max_model_len})
