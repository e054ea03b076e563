"""What every rollout engine shares: the `Sample` a completion comes back as, the
`RolloutEngine` interface, the engine names, and the per-prompt seed rule (`draw_seeds`).

The engines (opd.client.train.engines.hf, .vllm) and their callers import these from here;
opd.client.train.engines re-exports them next to `make_engine`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch

from opd.modeling.eos import Generated

if TYPE_CHECKING:
    from opd.client.train.rollouts import SamplingParams

EngineName = Literal["hf", "vllm"]
ENGINES: tuple[str, ...] = ("hf", "vllm")


@dataclass
class Sample:
    """One sampled completion: its ids (through the first EOS, which is kept), whether it hit
    max_new_tokens without EOS, the engine's own log-probs of the ids (None when the engine
    does not report them) and, when the sampling params ask for `top_ids`, the engine's top-K
    ids at every sampled position, highest first (the candidate ids the teacher scores in the
    one-forward step: docs/training.md)."""

    completion_ids: np.ndarray  # int64 [T]
    truncated: bool
    engine_logp_T: np.ndarray | None = None
    topk_ids_TK: np.ndarray | None = None  # int64 [T, K]

    @classmethod
    def of(cls, generated: Generated) -> Sample:
        """A row cut by the one EOS rule (opd.modeling.eos.cut_at_eos)."""
        return cls(np.asarray(generated.token_ids, dtype=np.int64), generated.truncated)


class RolloutEngine(Protocol):
    """The interface every engine implements."""

    name: str
    # whether the engine samples its own copy of the weights (then sync_weights after updates)
    holds_weights: bool

    def sample(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]
    ) -> list[list[Sample]]:
        """params.n completions of every prompt, in prompt order; seeds: one per prompt."""
        ...

    def sync_weights(self, state: Mapping[str, torch.Tensor]) -> float:
        """Make the engine sample these weights (the student's full state dict, HF names);
        returns seconds spent."""
        ...

    def sleep(self) -> None:
        """Free what the engine holds on the accelerator while the trainer updates (GPU)."""
        ...

    def wake(self) -> None:
        """Undo sleep() before the next sample()."""
        ...

    def close(self) -> None: ...


def draw_seeds(count: int) -> list[int]:
    """`count` seeds from torch's global RNG (63-bit, as vLLM's per-request seed accepts)."""
    return [int(s) for s in torch.randint(0, 2**62, (count,), dtype=torch.int64)]
