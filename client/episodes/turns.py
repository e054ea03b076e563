"""The values that pass between the trainer and an environment: a tool call, a student turn,
and the environment's answer to it. Plain dataclasses, no behaviour: base.py (the protocol and
the tool loop) and tools.py (parsing and running calls) both build on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ToolCall:
    """One call the student wrote. `id` is None for the tag format, which carries none.

    A tag whose JSON did not parse becomes a call with `name == ""` (tools.MALFORMED) and the
    parse error in `arguments["error"]`, so that the environment answers it with an error tool
    message, in order with the turn's other calls (tools.py explains why)."""

    name: str
    arguments: dict
    id: str | None = None


@dataclass
class AssistantTurn:
    """One student turn as the environment sees it.

    `text` is the decoded turn without special tokens (tool-call tags included, as written);
    `tool_calls` are the calls parsed out of it, in order; `truncated` is True when the turn
    hit the per-turn token cap before its end-of-turn token, so its text (and any tool call it
    was writing) is cut short."""

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    truncated: bool = False


@dataclass
class Observation:
    """The environment's answer to a turn.

    `messages` are chat messages ({"role": "tool" | "user" | ..., "content": str, optionally
    "name" / "tool_call_id"}) appended after the assistant turn; `done=True` ends the episode
    and its messages are then ignored (nothing follows the last turn); `reward` is optional,
    typically set on the final observation only."""

    messages: list[dict] = field(default_factory=list)
    done: bool = False
    reward: float | None = None
