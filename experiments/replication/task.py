"""The replication's task: 3-digit addition written out as a scratchpad, in two styles.

Both styles compute the same thing column by column from the ones digit, so a model trained on
either reaches the same accuracy; they differ in the *thinking pattern* a student would have to
share with its teacher:

    style x ("a first, full column sums"):  347+285 -> 7+5=12|4+8+1=13|3+2+1=6|632
    style y ("b first, digit and carry"):   347+285 -> 5+7+0>2;8+4+1>3;2+3+1>6;=632

The first completion token differs whenever a's and b's ones digits differ (nine problems in
ten), and so does every separator but `+`.
The answer is the last number of the completion in both, so opd's `numeric` verifier grades
them.

Knowledge is controlled by data. The "restricted facts" are the columns whose two digits sum to
13 or more (7+8, 9+9, ...: 21 of the 100 digit pairs); about half of all problems need at least
one. A restricted pipeline (`sample_pairs(restricted=True)`) never sees them, apart from the
few examples a model spec mixes in (`ModelSpec.rare_facts`), so what it knows of them depends on
how much a model gets out of those few.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

Style = Literal["x", "y"]
STYLES: tuple[Style, ...] = ("x", "y")
DIGITS = 3
LOW, HIGH = 10 ** (DIGITS - 1), 10**DIGITS - 1
# Digit pairs summing to this or more are the facts a restricted pipeline never sees.
RESTRICTED_FROM = 13


def prompt(a: int, b: int) -> str:
    """The user message for a + b: the bare sum, no instruction (the models know one task)."""
    return f"{a}+{b}"


def _columns(a: int, b: int) -> Iterator[tuple[int, int, int, int]]:
    """(digit of a, digit of b, carry in, column sum) per column, ones first."""
    carry = 0
    for i in range(DIGITS):
        da, db = (a // 10**i) % 10, (b // 10**i) % 10
        total = da + db + carry
        yield da, db, carry, total
        carry = total // 10


def scratchpad(a: int, b: int, style: Style) -> str:
    """The completion a model of `style` is trained to write for a + b."""
    if style == "x":
        steps = [f"{da}+{db}" + (f"+{c}" if c else "") + f"={s}" for da, db, c, s in _columns(a, b)]
        return "|".join(steps) + f"|{a + b}"
    steps = [f"{db}+{da}+{c}>{s % 10}" for da, db, c, s in _columns(a, b)]
    return ";".join(steps) + f";={a + b}"


def needs_restricted_fact(a: int, b: int) -> bool:
    """Whether some column's two digits sum to RESTRICTED_FROM or more."""
    return any(da + db >= RESTRICTED_FROM for da, db, _, _ in _columns(a, b))


def sample_pairs(
    n: int,
    rng: np.random.Generator,
    restricted: bool = False,
    exclude: set[tuple[int, int]] | None = None,
    only_restricted: bool = False,
) -> list[tuple[int, int]]:
    """n distinct (a, b) pairs, uniform over 3-digit operands, never one in `exclude`;
    `restricted`: only those a restricted pipeline sees; `only_restricted`: only those it
    does not."""
    if restricted and only_restricted:
        raise ValueError("sample_pairs: restricted and only_restricted exclude each other")
    seen = set(exclude or ())
    # Rejection sampling: refuse a request the space cannot fill instead of looping forever.
    space = (HIGH - LOW + 1) ** 2
    if n + len(seen) > space:
        raise ValueError(f"sample_pairs: n={n} with {len(seen)} excluded exceeds {space} pairs")
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        a, b = (int(v) for v in rng.integers(LOW, HIGH + 1, size=2))
        needs = needs_restricted_fact(a, b)
        if (a, b) in seen or (restricted and needs) or (only_restricted and not needs):
            continue
        seen.add((a, b))
        pairs.append((a, b))
    return pairs


def write_rows(pairs: list[tuple[int, int]], path: Path, **extra: object) -> Path:
    """A prompt set opd reads (`prompt`, `answer`, and whether it needs a restricted fact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for a, b in pairs:
            row = {
                "prompt": prompt(a, b),
                "answer": a + b,
                "needs_restricted_fact": needs_restricted_fact(a, b),
                **extra,
            }
            f.write(json.dumps(row) + "\n")
    return path
