"""`FollowupEnv`: a running computation over many turns, so that every episode is multi-turn
by construction (no tool needed, no luck in whether the student calls one).

    user:      Start with 7. Add 5. Answer with just the number.
    assistant: 12
    user:      Now multiply that by 3. Answer with just the number.
    assistant: 36
    ...

Operands are single digits and the running value stays within 0..99 (multiplication only
while the product does, division only when exact, subtraction never below 0): the embedded
SmolLM2-135M-Instruct gets such steps right sometimes, so the per-turn grades carry signal.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable

from opd.client.episodes.turns import AssistantTurn, Observation
from opd.client.evaluation.verifiers import verify_numeric

MAX_VALUE = 99
SYSTEM_PROMPT = (
    "Keep track of a running number. Answer each question with just the number, nothing else."
)
_ANSWER = "Answer with just the number."


def row_seed(row: dict, seed: int) -> int:
    """A seed from the row's content and `seed`: stable across processes and Python runs
    (unlike `hash()`, which is salted per process)."""
    text = json.dumps(row, sort_keys=True, default=str) + f"\x00{seed}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _next_operation(rng: random.Random, value: int) -> tuple[str, int, int]:
    """(instruction, operand, new value): one single-digit step that keeps 0 <= value <= 99."""
    choices = []
    for d in range(1, 10):
        if value + d <= MAX_VALUE:
            choices.append(("add", d, value + d))
        if value - d >= 0:
            choices.append(("subtract", d, value - d))
        if d >= 2 and value * d <= MAX_VALUE:
            choices.append(("multiply", d, value * d))
        if d >= 2 and value % d == 0 and value > 0:
            choices.append(("divide", d, value // d))
    kinds = sorted({c[0] for c in choices})
    kind = rng.choice(kinds)  # the kind first, so that each is as likely wherever it applies
    return rng.choice([c for c in choices if c[0] == kind])


def _instruction(kind: str, d: int, first: bool) -> str:
    if first:
        return {
            "add": f"Add {d}.",
            "subtract": f"Subtract {d}.",
            "multiply": f"Multiply it by {d}.",
            "divide": f"Divide it by {d}.",
        }[kind]
    return {
        "add": f"Now add {d} to that.",
        "subtract": f"Now subtract {d} from that.",
        "multiply": f"Now multiply that by {d}.",
        "divide": f"Now divide that by {d}.",
    }[kind]


class FollowupEnv:
    """A running computation of `turns` steps, each a user question graded on the next turn.

    The running value follows the correct arithmetic, not the student's answer. Why: each
    turn then has one right answer fixed by the row, so per-turn grades measure one step each
    (a single slip is not punished again on every later turn) and the episode's questions do
    not depend on what the student sampled, which keeps episodes comparable across rollouts
    and the environment deterministic given the row. After a wrong answer the next question
    states the correct value first ("That is not right: it is 12. Now ..."), so "that" always
    names the value the grade uses.

    `turn_correct` holds one bool per graded turn; the reward, on the final observation, is
    the fraction of all `turns` answered correctly (a truncated turn ends the episode, and the
    turns never asked count as wrong). Deterministic given the row and `seed` (the start value
    and the operations come from a hash of both).
    """

    def __init__(self, *, turns: int = 6, seed: int = 0) -> None:
        if turns < 1:
            raise ValueError(f"turns must be >= 1, got {turns}")
        self.turns = turns
        self.seed = seed
        self.tools: list[Callable] = []
        self.turn_correct: list[bool] = []
        self.start = 0
        self.values: list[int] = []
        self._questions: list[tuple[str, int, int]] = []

    def reset(self, row: dict) -> list[dict]:
        """Plan the whole episode from the row's hash, then ask the first step."""
        rng = random.Random(row_seed(row, self.seed))
        value = self.start = rng.randint(2, 9)
        self.turn_correct = []
        self._questions = []
        self.values = []
        for _ in range(self.turns):
            step = _next_operation(rng, value)
            self._questions.append(step)
            value = step[2]
            self.values.append(value)
        kind, d, _ = self._questions[0]
        first = f"Start with {self.start}. {_instruction(kind, d, first=True)} {_ANSWER}"
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": first}]

    def step(self, turn: AssistantTurn) -> Observation:
        """Grade the answer to the current question; ask the next one, or end with the reward."""
        if not self._questions:
            raise RuntimeError("FollowupEnv.step before reset")
        k = len(self.turn_correct)
        if k >= self.turns:
            raise RuntimeError("FollowupEnv.step after the episode ended")
        correct = verify_numeric(turn.text, str(self.values[k])).correct
        self.turn_correct.append(correct)
        if turn.truncated or len(self.turn_correct) == self.turns:
            return Observation(messages=[], done=True, reward=sum(self.turn_correct) / self.turns)
        kind, d, _ = self._questions[k + 1]
        lead = "" if correct else f"That is not right: it is {self.values[k]}. "
        question = f"{lead}{_instruction(kind, d, first=False)} {_ANSWER}"
        return Observation(messages=[{"role": "user", "content": question}], done=False)
