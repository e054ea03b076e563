"""What an environment is to opd's trainer: the turn types, the `Environment` protocol, the
error that names where an episode broke, and `ToolEnvironment`, the loop most tool-using
environments share.

The trainer runs an episode token-in/token-out: the student samples an assistant turn, the
renderer (render.py) parses it into an `AssistantTurn`, the environment answers with an
`Observation` (new messages, or the end of the episode), and the renderer turns those messages
into token ids appended to the sequence so far. An environment therefore never sees or returns
token ids: it speaks chat messages, and stays independent of the tokenizer.

The turn types (`ToolCall`, `AssistantTurn`, `Observation`) live in turns.py, so that tools.py
can build them without importing this module (which runs tools.py's calls); they are
re-exported here.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from opd.client.episodes.tools import execute_tool_call, tool_table
from opd.client.episodes.turns import AssistantTurn, Observation, ToolCall

__all__ = [
    "AssistantTurn",
    "Environment",
    "EpisodeError",
    "Observation",
    "ToolCall",
    "ToolEnvironment",
]


@runtime_checkable
class Environment(Protocol):
    """An episode's world. The trainer makes one instance per episode (so state needs no
    clearing), calls `reset` once, then `step` after every student turn until `done`."""

    tools: list[Callable]
    """Plain Python functions with type hints and Google-style docstrings (the form TRL and
    transformers' `get_json_schema` take), empty if none. The renderer turns them into the
    schemas the student is shown; they exist on the environment because only it knows which
    tools its episodes offer."""

    def reset(self, row: dict) -> list[dict]:
        """The episode's opening messages (e.g. a system and a user message) from a data row.
        Separate from the constructor so one factory serves every row of a data set."""
        ...

    def step(self, turn: AssistantTurn) -> Observation:
        """React to one student turn: run its tool calls, ask the next question, or end the
        episode with a reward. The only place the environment's state changes."""
        ...


class EpisodeError(RuntimeError):
    """An environment raised. Carries where (episode index, turn index: 0 is `reset`, k >= 1
    the k-th `step`) so that one bad row among thousands can be found, and the cause."""

    def __init__(self, environment: str, episode: int, turn: int, cause: BaseException) -> None:
        self.environment = environment
        self.episode = episode
        self.turn = turn
        self.cause = cause
        super().__init__(
            f"environment {environment} raised at episode {episode}, turn {turn}: "
            f"{type(cause).__name__}: {cause}"
        )
        self.__cause__ = cause


class ToolEnvironment(abc.ABC):
    """The common loop of tool-using environments; subclasses write `reset` and `reward`.

    On each turn:
    - with tool calls, each call runs (by name against `tools`) and the results come back as
      tool messages, `done=False`;
    - without a tool call, the episode ends (`done=True`) with `reward(turn)`;
    - a truncated turn ends the episode too, with `reward(turn)`: its end-of-turn token is
      missing, so nothing the template would produce can follow it, and a tool call it was
      writing is incomplete;
    - past `max_tool_calling_iterations` turns that ran tools, the next turn ends the episode
      whatever it holds (TRL's `max_tool_calling_iterations` semantics: the last completion is
      kept as it is).

    An unknown tool name, arguments that do not fit the function's signature, a tag whose JSON
    did not parse, and a tool that raises each give a tool message with an error text, never an
    exception. Why: these are the student's mistakes (or a tool's refusal of its input), part
    of what it must learn to recover from, as with a real API that answers with an error; an
    exception would throw away the whole episode and stop the run. TRL's tool loop makes the
    same choice. Bugs in the environment itself (in `reset`, `reward`) still raise.
    `tool_calls` and `tool_errors` count calls and failures for the trainer's metrics.
    """

    def __init__(
        self, tools: Sequence[Callable] = (), *, max_tool_calling_iterations: int | None = None
    ) -> None:
        if max_tool_calling_iterations is not None and max_tool_calling_iterations < 0:
            raise ValueError(
                "max_tool_calling_iterations must be >= 0 or None, "
                f"got {max_tool_calling_iterations}"
            )
        self.tools: list[Callable] = list(tools)
        self._table = tool_table(self.tools)
        self.max_tool_calling_iterations = max_tool_calling_iterations
        self.tool_iterations = 0
        self.tool_calls = 0
        self.tool_errors = 0

    @abc.abstractmethod
    def reset(self, row: dict) -> list[dict]:
        """The opening messages of the episode for this row (see `Environment.reset`)."""

    def reward(self, turn: AssistantTurn) -> float | None:
        """The episode's reward, given its final turn; None (no reward) unless overridden.
        OPD learns from the teacher's scores, so a reward is an outcome metric, not a need."""
        return None

    def step(self, turn: AssistantTurn) -> Observation:
        """Run the turn's tool calls, or end the episode (see the class docstring)."""
        limit = self.max_tool_calling_iterations
        spent = limit is not None and self.tool_iterations >= limit
        if turn.truncated or not turn.tool_calls or spent:
            return Observation(messages=[], done=True, reward=self.reward(turn))
        self.tool_iterations += 1
        messages = []
        for call in turn.tool_calls:
            result = execute_tool_call(call, self._table)
            self.tool_calls += 1
            self.tool_errors += not result.ok
            messages.append(result.message)
        return Observation(messages=messages, done=False)
