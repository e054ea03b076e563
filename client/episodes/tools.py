"""Tools as the student sees and calls them: JSON schemas from plain functions, the tag format
for chat templates that have no tool format of their own, parsing a turn's text into calls, and
running one call.

The tag format (Hermes / Qwen style, what Qwen2.5, Qwen3 and Hermes templates produce):

    <tool_call>{"name": "calculator", "arguments": {"expression": "3 * 4"}}</tool_call>

A turn may hold several tags; the calls run in order. Whitespace around the JSON is allowed
(Qwen writes a newline on each side). "arguments" is an object (a JSON string holding an object
is accepted too, as OpenAI writes it); a missing "arguments" means no arguments.

A tag that does not parse (bad JSON, no "name", arguments that are not an object, a tag left
unclosed in a turn that was not truncated) becomes a `ToolCall` with the name `MALFORMED` ("")
and `arguments={"error": WHY, "text": THE TAG'S TEXT}`, not an exception and not a silent drop:
the environment answers it with an error tool message, so the student is told its call failed
and why (as with an unknown tool), and the calls stay in the order they were written. An
unclosed tag at the end of a *truncated* turn is dropped: the cap cut it, the student did not
write it wrong, and the episode ends there anyway.

Schemas come from transformers' `get_json_schema` (what `apply_chat_template(tools=[fn])` and
TRL use), imported when first needed: importing this module loads neither transformers nor
torch.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opd.client.episodes.turns import AssistantTurn, ToolCall

MALFORMED = ""
"""The name of a `ToolCall` whose tag did not parse."""

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
_TAG = re.compile(re.escape(OPEN_TAG) + r"(.*?)" + re.escape(CLOSE_TAG), re.DOTALL)


# --------------------------------------------------------------------------------------------
# schemas
# --------------------------------------------------------------------------------------------


def tool_schema(fn: Callable) -> dict:
    """The JSON schema of a tool function ({"type": "function", "function": {...}}), as chat
    templates and TRL take it. Raises ValueError naming the tool when its type hints or
    docstring cannot be read (every argument needs a type hint and an `Args:` line)."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:  # transformers' DocstringParsingException, TypeHintParsingException
        name = getattr(fn, "__name__", repr(fn))
        raise ValueError(
            f"tool {name!r}: cannot build its JSON schema ({e}); a tool needs type hints on every "
            "argument and a Google-style docstring with a description and an Args: section"
        ) from e


def tool_schemas(tools: Sequence[Callable]) -> list[dict]:
    """The schemas of several tools, in order."""
    return [tool_schema(fn) for fn in tools]


def tool_table(tools: Sequence[Callable]) -> dict[str, Callable]:
    """Tools by the name the student calls them by (the function's `__name__`). Two tools with
    one name would make a call ambiguous, so they raise ValueError."""
    table: dict[str, Callable] = {}
    for fn in tools:
        name = getattr(fn, "__name__", None)
        if not callable(fn) or not name:
            raise ValueError(f"a tool must be a named function, got {fn!r}")
        if name in table:
            raise ValueError(f"two tools are named {name!r}; tool names must be unique")
        table[name] = fn
    return table


def describe_tools(schemas: Sequence[dict]) -> str:
    """One JSON schema per line, as the tag-format instructions list them."""
    return "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)


TAG_FORMAT_INSTRUCTIONS = """You can call these tools:
<tools>
{tools}
</tools>
To call a tool, write a tool call in exactly this form:
<tool_call>{{"name": "TOOL_NAME", "arguments": {{"ARGUMENT": VALUE}}}}</tool_call>
You may write several tool calls in one reply. Each result comes back in the next message, \
from the tool. When you have the final answer, reply without any tool call."""
"""The system-message text that teaches the tag format to a template without a tool format
({tools}: `describe_tools` of the schemas)."""


def tag_format_instructions(schemas: Sequence[dict]) -> str:
    """`TAG_FORMAT_INSTRUCTIONS` filled with the schemas."""
    return TAG_FORMAT_INSTRUCTIONS.format(tools=describe_tools(schemas))


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------


def format_tool_call(name: str, arguments: dict) -> str:
    """A call in the tag format (what a student should write; tests and examples use it)."""
    return OPEN_TAG + json.dumps({"name": name, "arguments": arguments}) + CLOSE_TAG


def _malformed(why: str, text: str) -> ToolCall:
    return ToolCall(name=MALFORMED, arguments={"error": why, "text": text})


def _parse_one(body: str, tag_text: str) -> ToolCall:
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        return _malformed(f"the JSON inside {OPEN_TAG} does not parse ({e.msg})", tag_text)
    if not isinstance(data, dict):
        return _malformed("the JSON inside the tag is not an object", tag_text)
    name = data.get("name")
    if not isinstance(name, str) or not name:
        return _malformed('the call has no "name" string', tag_text)
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return _malformed('"arguments" is a string that is not JSON', tag_text)
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return _malformed('"arguments" is not an object', tag_text)
    call_id = data.get("id")
    return ToolCall(name, arguments, call_id if isinstance(call_id, str) else None)


def parse_tool_calls(text: str, *, truncated: bool = False) -> list[ToolCall]:
    """Every call in the text, in order (see the module docstring for malformed tags)."""
    matches = list(_TAG.finditer(text))
    calls = [_parse_one(m.group(1).strip(), m.group(0)) for m in matches]
    tail = text[matches[-1].end() :] if matches else text
    if OPEN_TAG in tail and not truncated:
        unclosed = tail[tail.index(OPEN_TAG) :]
        calls.append(_malformed(f"the {OPEN_TAG} tag is never closed with {CLOSE_TAG}", unclosed))
    return calls


def parse_assistant_text(text: str, *, truncated: bool = False) -> AssistantTurn:
    """A decoded student turn as an `AssistantTurn` (text kept whole, tags included)."""
    return AssistantTurn(
        text=text, tool_calls=parse_tool_calls(text, truncated=truncated), truncated=truncated
    )


def parse_error(call: ToolCall) -> str | None:
    """Why the call's tag did not parse, or None for a well-formed call."""
    if call.name != MALFORMED:
        return None
    return str(call.arguments.get("error", "the tool call could not be parsed"))


# --------------------------------------------------------------------------------------------
# running a call
# --------------------------------------------------------------------------------------------


@dataclass
class ToolResult:
    """A call's tool message, and whether the call worked (`ok=False`: the message is an error
    text for the student)."""

    message: dict
    ok: bool


def _content(value: Any) -> str:
    """A tool's return value as message text: strings as they are, JSON for dicts and lists
    (readable, unlike Python's repr), str() for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        try:
            return json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def _message(call: ToolCall, content: str) -> dict:
    message: dict = {"role": "tool", "content": content}
    if call.name != MALFORMED:
        message["name"] = call.name
    if call.id is not None:
        message["tool_call_id"] = call.id
    return message


def _signature(fn: Callable) -> str:
    """name(a: int, b: int) -> int, with the hints evaluated (string annotations otherwise
    print quoted under `from __future__ import annotations`)."""
    try:
        try:
            return f"{fn.__name__}{inspect.signature(fn, eval_str=True)}"
        except NameError:
            return f"{fn.__name__}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return fn.__name__


def execute_tool_call(call: ToolCall, tools: Mapping[str, Callable]) -> ToolResult:
    """Run one call against `tools` (name -> function). Never raises for the student's
    mistakes or the tool's failures: each gives an error tool message ("Error: ...") instead
    (base.ToolEnvironment explains why). Async tools are refused where they are registered
    (trl_adapters.py), not here."""
    why = parse_error(call)
    if why is not None:
        example = format_tool_call("TOOL_NAME", {"ARGUMENT": "VALUE"})
        return ToolResult(
            _message(call, f"Error: could not read the tool call: {why}. Write it as {example}."),
            ok=False,
        )
    fn = tools.get(call.name)
    if fn is None:
        known = ", ".join(sorted(tools)) or "none"
        return ToolResult(
            _message(call, f"Error: unknown tool {call.name!r}. Available tools: {known}."),
            ok=False,
        )
    try:
        inspect.signature(fn).bind(**call.arguments)
    except TypeError as e:
        text = f"Error: bad arguments for {call.name}: {e}. Expected {_signature(fn)}."
        return ToolResult(_message(call, text), ok=False)
    except ValueError:  # a builtin without a readable signature: let the call decide
        pass
    try:
        value = fn(**call.arguments)
    except Exception as e:
        return ToolResult(
            _message(call, f"Error: {call.name} failed: {type(e).__name__}: {e}"), ok=False
        )
    return ToolResult(_message(call, _content(value)), ok=True)
