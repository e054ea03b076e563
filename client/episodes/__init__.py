"""opd.client.episodes: the environment side of multi-turn and tool-use OPD.

The trainer runs episodes turn by turn, token-in/token-out: the student samples a turn, the
renderer parses it into an `AssistantTurn`, the environment answers with an `Observation`, and
the renderer turns the answer's messages into ids appended to the exact sequence so far
(docs/environments.md). Nothing here imports torch; transformers is imported only to build
tool schemas.

    turns.py         ToolCall, AssistantTurn, Observation: what passes between trainer and env
    base.py          the Environment protocol, EpisodeError, ToolEnvironment (the tool loop)
    tools.py         tool schemas, the <tool_call> tag format, parsing a turn, running a call
    render.py        TurnRenderer: opening ids, observation ids, end-of-turn ids, parsing
    calculator.py    CalculatorEnv: arithmetic tasks with a safe calculator tool
    followup.py      FollowupEnv: a running computation over many turns
    trl_adapters.py  TRL's tools=[...] and environment_factory, unchanged
    loading.py       load_environment("calculator" | "module:Class" | "trl:module:Class")
"""

from opd.client.episodes.base import Environment, EpisodeError, ToolEnvironment
from opd.client.episodes.calculator import CalculatorEnv, calculator
from opd.client.episodes.followup import FollowupEnv
from opd.client.episodes.loading import EnvironmentFactory, load_environment
from opd.client.episodes.render import RenderError, TurnRenderer
from opd.client.episodes.tools import (
    MALFORMED,
    TAG_FORMAT_INSTRUCTIONS,
    ToolResult,
    execute_tool_call,
    format_tool_call,
    parse_assistant_text,
    parse_error,
    parse_tool_calls,
    tool_schema,
    tool_schemas,
)
from opd.client.episodes.trl_adapters import FunctionToolsEnv, TRLEnvironment
from opd.client.episodes.turns import AssistantTurn, Observation, ToolCall

__all__ = [
    "MALFORMED",
    "TAG_FORMAT_INSTRUCTIONS",
    "AssistantTurn",
    "CalculatorEnv",
    "Environment",
    "EnvironmentFactory",
    "EpisodeError",
    "FollowupEnv",
    "FunctionToolsEnv",
    "Observation",
    "RenderError",
    "TRLEnvironment",
    "ToolCall",
    "ToolEnvironment",
    "ToolResult",
    "TurnRenderer",
    "calculator",
    "execute_tool_call",
    "format_tool_call",
    "load_environment",
    "parse_assistant_text",
    "parse_error",
    "parse_tool_calls",
    "tool_schema",
    "tool_schemas",
]
