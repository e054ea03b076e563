"""The long-horizon task: a chain of additions played as an episode, in the replication's
character world (its tokenizer, its style-x scratchpad).

    user:       247+38                     (the start a and the first addend c_1)
    assistant:  7+8=15|4+3+1=8|2+0=2|285   (the scratchpad of a + c_1, ending in the total)
    user:       +56                        (the next addend: add it to *your* last total)
    assistant:  5+6=11|8+5+1=14|2+0+1=3|341
    ...                                    (T turns)

Why this task: each turn is one 3-digit + 2-digit addition the replication's models already
learn in minutes, but from turn 1 on the model must find the number it wrote itself one turn
earlier, further back in the sequence at every turn. A teacher trained on episodes of at most
K turns has never seen a depth past its K-th turn, so its per-token signal is expected to fade
with depth (the premise the study measures, not assumes). Totals stay below 1000, so every
scratchpad has the replication's three columns.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.replication import task as addition

START_LOW, START_HIGH = 100, 399
ADDEND_LOW, ADDEND_HIGH = 10, 99
STYLE = "x"  # the replication's style x: a's digit first, full column sums


@dataclass(frozen=True)
class Chain:
    """One episode's numbers: the start and the addends (the episode plays the first T)."""

    start: int
    addends: tuple[int, ...]

    def totals(self, turns: int | None = None) -> list[int]:
        """The true running totals after each of the first `turns` addends."""
        out, value = [], self.start
        for c in self.addends[:turns]:
            value += c
            out.append(value)
        return out

    def row(self) -> dict:
        """The data row opd reads: `prompt` (the opening message, for loaders and reports),
        `answer` (the true final total, for loaders that want one), and the chain itself,
        which the environment plays."""
        return {
            "prompt": opening(self.start, self.addends[0]),
            "answer": self.totals()[-1],
            "start": self.start,
            "addends": list(self.addends),
        }


def opening(start: int, addend: int) -> str:
    """The first user message: the replication's bare sum."""
    return addition.prompt(start, addend)


def follow_up(addend: int) -> str:
    """Every later user message: the addend alone; the model carries its own last total."""
    return f"+{addend}"


def scratchpad(total: int, addend: int) -> str:
    """The assistant turn that adds `addend` to `total` (the replication's style x)."""
    return addition.scratchpad(total, addend, STYLE)


def start_high(turns: int) -> int:
    """The largest start whose chain of `turns` largest addends stays below 1000."""
    return min(START_HIGH, 999 - ADDEND_HIGH * turns)


def sample_chains(
    n: int,
    turns: int,
    rng: np.random.Generator,
    exclude: set[tuple[int, ...]] | None = None,
    distinct: bool = True,
) -> list[Chain]:
    """n chains of `turns` addends, none whose (start, first addend) opening is in `exclude`
    (so a held-out episode never opens like a training one); `distinct`: no two share an
    opening either. SFT sets are drawn with `distinct=False`: there are only 27,000 openings,
    fewer than a teacher's SFT examples, and repeats among training chains are harmless."""
    high = start_high(turns)
    if high < START_LOW:
        raise ValueError(f"sample_chains: {turns} turns cannot keep totals below 1000")
    seen = set(exclude or ())
    out: list[Chain] = []
    space = (high - START_LOW + 1) * (ADDEND_HIGH - ADDEND_LOW + 1)
    if distinct and n + len(seen) > space:
        raise ValueError(f"sample_chains: {n} chains with {len(seen)} excluded exceed {space}")
    while len(out) < n:
        start = int(rng.integers(START_LOW, high + 1))
        addends = tuple(int(v) for v in rng.integers(ADDEND_LOW, ADDEND_HIGH + 1, size=turns))
        key = (start, addends[0])
        if key in seen:
            continue
        if distinct:
            seen.add(key)
        out.append(Chain(start, addends))
    return out


def openings(chains: Sequence[Chain]) -> set[tuple[int, ...]]:
    """The (start, first addend) of every chain: what `sample_chains(exclude=...)` avoids."""
    return {(c.start, c.addends[0]) for c in chains}


def write_rows(chains: Sequence[Chain], path: Path) -> Path:
    """The chains as a JSONL data set opd reads (`--prompts`, `--data`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(c.row()) + "\n" for c in chains))
    return path
