"""TRL's two ways of giving a model tools, run unchanged as opd environments.

- `tools=[fn, ...]` with `max_tool_calling_iterations` (DistillationTrainer, GRPOTrainer):
  plain functions with type hints and Google-style docstrings. `FunctionToolsEnv` takes the
  same list and the same limit; the episode opens with the row's "prompt" (or "messages").
- `environment_factory=Cls` (GRPOTrainer): a class whose public methods are the tools, with
  `reset(**row) -> str | None` and optionally `get_reward() -> float`. `TRLEnvironment` wraps
  one instance and drives it as GRPOTrainer does (trl/trainer/grpo_trainer.py, TRL 1.16):
  - tools: the public functions of the *class* (`inspect.getmembers(type(obj),
    inspect.isfunction)`, so properties are not evaluated), minus `reset`, `get_reward` and
    names starting with "_", bound to the instance;
  - `reset` gets the whole row as keyword arguments (the single-factory case), and a string
    it returns is appended, with no separator, to the content of the prompt's last message;
  - `get_reward()` is called once, when the episode ends, and is the episode's reward.

Not wrapped, and why:
- async tools and an async `get_reward`: refused when the environment is built. An opd
  environment's `step` is synchronous, and running a coroutine there would need an event loop
  the trainer's own thread may already be in (TRL's DistillationTrainer refuses them too).
- a dict of factories (`environment_factory={"name": Cls}`): the renderer is built once per
  run from one set of tools, so per-row tool sets would need a renderer per episode. Run one
  factory per run.
- multimodal observations (`reset` returning content blocks): opd's episodes are text.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from opd.client.episodes.base import ToolEnvironment
from opd.client.episodes.turns import AssistantTurn

_NOT_TOOLS = ("reset", "get_reward")


def _refuse_async(fn: Callable, what: str) -> None:
    if inspect.iscoroutinefunction(fn):
        name = getattr(fn, "__name__", repr(fn))
        raise ValueError(
            f"{what} {name!r} is async; opd's environments step synchronously, so pass a "
            "synchronous function (TRL's DistillationTrainer has the same rule)"
        )


def row_opening(row: dict) -> list[dict]:
    """The opening messages of a TRL-style row: "prompt" as a string (one user message) or a
    list of messages, else "messages" without its trailing assistant messages (in SFT data
    they are the reference answer, which the student must not be shown)."""
    if "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        if isinstance(prompt, list):
            return [dict(m) for m in prompt]
        raise ValueError(
            f"row 'prompt' must be a string or a list of messages, got {type(prompt).__name__}"
        )
    if "messages" in row and isinstance(row["messages"], list):
        messages = [dict(m) for m in row["messages"]]
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()
        if not messages:
            raise ValueError("row 'messages' holds no message before the assistant's")
        return messages
    raise ValueError(f"the row has neither 'prompt' nor 'messages' (fields: {sorted(row)})")


class FunctionToolsEnv(ToolEnvironment):
    """TRL's `tools=[...]` as an opd environment: the functions unchanged, at most
    `max_tool_calling_iterations` turns that run tools (None: no limit but the trainer's),
    the opening from the row (`row_opening`). No reward (None) unless a subclass overrides
    `reward`: TRL's reward functions take whole batches, and OPD needs none."""

    def __init__(
        self, tools: Sequence[Callable], max_tool_calling_iterations: int | None = None
    ) -> None:
        for fn in tools:
            _refuse_async(fn, "tool")
        super().__init__(tools, max_tool_calling_iterations=max_tool_calling_iterations)

    def reset(self, row: dict) -> list[dict]:
        return row_opening(row)


def environment_tools(instance: Any) -> list[Callable]:
    """The tools TRL takes from an environment instance: its class's public functions other
    than `reset` and `get_reward`, bound to the instance."""
    return [
        getattr(instance, name)
        for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
        if name not in _NOT_TOOLS and not name.startswith("_")
    ]


class TRLEnvironment(ToolEnvironment):
    """One instance from a TRL `environment_factory`, driven as GRPOTrainer drives it (see the
    module docstring). A row's string "prompt" becomes one user message (TRL requires
    conversational prompts with environments; opd's prompt sets are strings)."""

    def __init__(self, instance: Any, max_tool_calling_iterations: int | None = None) -> None:
        reset = getattr(type(instance), "reset", None)
        if not inspect.isfunction(reset):
            raise ValueError(
                f"{type(instance).__name__} has no reset method; a TRL environment needs "
                "reset(**kwargs) -> str | None"
            )
        tools = environment_tools(instance)
        for fn in tools:
            _refuse_async(fn, "tool")
        self._get_reward = getattr(instance, "get_reward", None)
        if self._get_reward is not None:
            _refuse_async(self._get_reward, "get_reward")
        self.instance = instance
        super().__init__(tools, max_tool_calling_iterations=max_tool_calling_iterations)

    def reset(self, row: dict) -> list[dict]:
        prompt = row.get("prompt", [{"role": "user", "content": ""}])
        messages = row_opening({"prompt": prompt})
        observation = self.instance.reset(**row)
        if observation is None:
            return messages
        if not isinstance(observation, str):
            raise TypeError(
                f"{type(self.instance).__name__}.reset returned {type(observation).__name__}; "
                "opd takes None or a string (multimodal observations are not supported)"
            )
        last = messages[-1]
        messages[-1] = {**last, "content": str(last.get("content", "")) + observation}
        return messages

    def reward(self, turn: AssistantTurn) -> float | None:
        """`get_reward()` when the environment defines it, else None."""
        if self._get_reward is None:
            return None
        value = self._get_reward()
        return None if value is None else float(value)
