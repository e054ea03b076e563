"""`ChainEnv`: the chain of additions (task.py) as an opd environment, for `opd train / probe /
eval --env experiments.longhorizon.env:ChainEnv --env-arg turns=6`.

Modelled on opd's FollowupEnv (client/episodes/followup.py): one instance per episode, the
whole episode fixed by its row, each assistant turn graded (`turn_correct`) and the reward the
share of the episode's `turns` answered right, on the final observation.

Grading: turn j is right when its answer (the last number of the turn, as opd's `numeric`
verifier reads it) equals *the model's own previous answer* plus c_j (turn 0: a + c_1). Why
not the true running total, as FollowupEnv does: FollowupEnv restates the correct value after
a wrong answer, so its next question is always about the true total; here the next message is
only `+c` and the model must carry the number it wrote itself, so the question it actually
faces at turn j is "your total + c_j". Grading against that measures the skill at each depth
(find your last total, add): one slip at turn 1 is not counted again at every later turn, and
the per-turn accuracy by depth is what the study compares. An episode with every turn right is
right under both rules (turn 0 is graded against the true a + c_1). A turn with no number
leaves nothing to carry: the next turn is graded against the true running total then.
"""

from __future__ import annotations

from collections.abc import Callable

from experiments.longhorizon import task
from opd.client.episodes.turns import AssistantTurn, Observation
from opd.client.evaluation.verifiers import extract_last_number, parse_number


def answer_of(text: str) -> int | None:
    """The turn's answer: its last number as an integer (None: none, or not an integer)."""
    last = extract_last_number(text)
    value = None if last is None else parse_number(last)
    if value is None or value.denominator != 1:
        return None
    return int(value)


class ChainEnv:
    """A chain of `turns` additions; each turn adds the next addend to the last total."""

    def __init__(self, *, turns: int = 6) -> None:
        if turns < 1:
            raise ValueError(f"turns must be >= 1, got {turns}")
        self.turns = turns
        self.tools: list[Callable] = []
        self.turn_correct: list[bool] = []
        self.answers: list[int | None] = []
        self.chain: task.Chain | None = None

    def reset(self, row: dict) -> list[dict]:
        """The opening message `a+c1` of the row's chain (which must hold `turns` addends)."""
        addends = tuple(int(c) for c in row["addends"])
        if len(addends) < self.turns:
            raise ValueError(f"ChainEnv: the row has {len(addends)} addends, turns={self.turns}")
        self.chain = task.Chain(int(row["start"]), addends[: self.turns])
        self.turn_correct, self.answers = [], []
        return [{"role": "user", "content": task.opening(self.chain.start, addends[0])}]

    def expected(self, j: int) -> int:
        """What turn j must answer: the model's previous answer (the true total when it wrote
        none; the start at turn 0) plus c_{j+1}."""
        assert self.chain is not None
        previous = self.answers[j - 1] if j else self.chain.start
        if previous is None:
            previous = self.chain.start + sum(self.chain.addends[:j])
        return previous + self.chain.addends[j]

    def step(self, turn: AssistantTurn) -> Observation:
        """Grade the turn; ask the next addend, or end with the reward."""
        if self.chain is None:
            raise RuntimeError("ChainEnv.step before reset")
        j = len(self.turn_correct)
        if j >= self.turns:
            raise RuntimeError("ChainEnv.step after the episode ended")
        answer = answer_of(turn.text)
        self.turn_correct.append(answer is not None and answer == self.expected(j))
        self.answers.append(answer)
        if turn.truncated or j + 1 == self.turns:
            return Observation(messages=[], done=True, reward=sum(self.turn_correct) / self.turns)
        next_message = task.follow_up(self.chain.addends[j + 1])
        return Observation(messages=[{"role": "user", "content": next_message}], done=False)
