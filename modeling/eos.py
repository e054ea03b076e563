"""Where a generated completion ends: one EOS rule for the teacher's /v1/generate and the
student's rollout engines, so both sides cut the same row at the same token.

A turn ends at any id in `eos_ids`: the tokenizer's EOS plus every EOS the model's generation
config names (chat models often list several, e.g. end-of-turn and end-of-text). The EOS that
ended a completion is kept (it is a sampled token the student is trained on and the teacher
scores); anything after it (padding of a batched generate) is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass
class Generated:
    """One completion: ids up to and including the first EOS, and why it ended."""

    token_ids: list[int]
    finish_reason: str  # "stop" | "length"

    @property
    def truncated(self) -> bool:
        """True when the token budget ran out before any EOS."""
        return self.finish_reason == "length"


def eos_ids(tokenizer: object, generation_config: object | None) -> frozenset[int]:
    """Every id that ends a turn: the tokenizer's EOS plus the model's generation-config EOS."""
    ids: set[int] = set()
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(int(tok_eos))
    gen_eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return frozenset(ids)


def cut_at_eos(row: np.ndarray | Iterable[int], eos: Iterable[int]) -> Generated:
    """A generated row cut after its first EOS (kept); what follows it dropped."""
    ids = np.asarray(list(row) if not isinstance(row, np.ndarray) else row, dtype=np.int64)
    stops = np.flatnonzero(np.isin(ids, np.fromiter(eos, dtype=np.int64)))
    if stops.size:
        return Generated(ids[: stops[0] + 1].tolist(), "stop")
    return Generated(ids.tolist(), "length")
