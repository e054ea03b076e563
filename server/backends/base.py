"""The backend interface: what the batcher needs from whatever computes teacher numbers.

A backend receives a *pack*: sequences from possibly many requests, chosen by the batcher to
share one forward pass. Each item carries its own options (top_k, candidates, temperature,
entropy), so a backend must never let one request's options leak into another's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from opd.modeling.eos import Generated
from opd.modeling.scoring import ScoredRows
from opd.shared.packed import PackedRequest
from opd.shared.schemas import GenerateOptions, ModelInfo, ScoreOptions


@dataclass
class ScoreItem:
    """One sequence to score: tokens x_0..x_{L-1}, one row per scored position p in
    `positions` (absolute, increasing), about x_p given x_{<p}.

    `positions` left out is x_s..x_{L-1} (s = score_from); with scored spans it is what
    PackedRequest.scored_positions gives, and `score_from` is its first entry: every token
    before it is context shared by all rows (the HF backend's shared-context groups key on it).
    """

    token_ids: np.ndarray
    score_from: int
    candidate_ids: np.ndarray | None
    options: ScoreOptions
    positions: np.ndarray = None  # type: ignore[assignment]  # filled in __post_init__

    def __post_init__(self) -> None:
        if self.positions is None:
            self.positions = np.arange(self.score_from, len(self.token_ids), dtype=np.int64)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def n_scored(self) -> int:
        return len(self.positions)

    @property
    def is_tail(self) -> bool:
        """Whether the rows are the contiguous tail score_from..L-1 (no gaps)."""
        return self.n_scored == self.n_tokens - self.score_from


def items_from_request(request: PackedRequest) -> list[ScoreItem]:
    """One ScoreItem per sequence of a request (views into its arrays, no copies)."""
    offs = request.seq_offsets_n1
    return [
        ScoreItem(
            token_ids=request.token_ids_T[offs[i] : offs[i + 1]],
            score_from=int(request.score_from_n[i]),
            candidate_ids=request.candidates(i),
            options=request.options,
            positions=request.scored_positions(i) if request.has_spans else None,  # type: ignore[arg-type]
        )
        for i in range(request.n_sequences)
    ]


class Backend(Protocol):
    tokenizer: object | None  # set by load(): renders chat prompts and decodes completions
    device: object  # torch.device the model runs on
    streams: int  # CPU streams a pack is split across (opd.server.streams); 1 elsewhere
    gemm: str  # BLAS of the streams' matmuls, "torch" or "numpy" (opd.modeling.cpu_gemm)

    def load(self) -> ModelInfo:
        """Load weights and tokenizer (blocking; called off the event loop); return what
        GET /v1/model publishes, limits clamped to the context (hf.describe_model)."""
        ...

    def score_pack(self, items: list[ScoreItem]) -> list[ScoredRows]:
        """Score every item of one pack; result i belongs to items[i] (blocking)."""
        ...

    @property
    def can_generate(self) -> bool:
        """Whether generate() works (vLLM: the generate engine started)."""
        ...

    def generate(self, prompts: list[list[int]], options: GenerateOptions) -> list[list[Generated]]:
        """n completions per token-id prompt, in prompt order (blocking; POST /v1/generate)."""
        ...

    def close(self) -> None:
        """Release the model and any engine processes."""
        ...
