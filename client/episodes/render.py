"""Chat messages to token ids, turn by turn, without ever re-rendering an earlier turn.

An episode's token sequence is built by appending: the opening prompt (`opening_ids`), the
student's turn exactly as sampled (its ids, ending with its end-of-turn token), the ids of the
environment's answer (`observation_ids`), the next turn, and so on. Rendering the whole
conversation again through the chat template each turn would be wrong twice over: templates
are not prefix-stable (Qwen3's drops the reasoning of earlier turns; many re-tokenize the
student's text into other ids than it sampled), so the re-rendered sequence would not be the
one the student produced, and the teacher would score tokens the student never chose.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from opd.client.episodes.tools import parse_assistant_text, tag_format_instructions, tool_schemas
from opd.client.episodes.turns import AssistantTurn

# The fixed base conversation observation ids are cut from. Its words are arbitrary: only what
# the template writes after the assistant message's end token is kept.
_BASE_USER = "Hello."
_BASE_ASSISTANT = "Hello! How can I help?"


class RenderError(ValueError):
    """The chat template cannot be used turn by turn (no end token after an assistant message,
    or earlier turns render differently once messages follow them)."""


class TurnRenderer:
    """A tokenizer's chat template, used turn by turn (see the module docstring).

    `tools` are the environment's tool functions. When the template has a tool format (it
    renders something different when given `tools=`), the schemas go through it. When it has
    none (SmolLM2-135M-Instruct's ChatML template), the schemas and the tag format's
    instructions (tools.TAG_FORMAT_INSTRUCTIONS, exact text there) go into the system message:
    appended to the first message after a blank line when that is a system message, else as a
    new system message of their own in front (which replaces a template's default system
    prompt, as any system message does).

    Student turns are parsed with the tag format (tools.py): it is what Hermes and Qwen
    templates produce, and the format the instructions teach. transformers' response parsing
    (`tokenizer.parse_response`) is not used: it needs the prompt as a prefix and a
    `response_template`, which few tokenizers ship.
    """

    def __init__(self, tokenizer: Any, tools: Sequence[Callable] = ()) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise RenderError("the tokenizer has no chat template; episodes need one")
        self.tokenizer = tokenizer
        self.tools = list(tools)
        self.tool_schemas: list[dict] = tool_schemas(self.tools) if self.tools else []
        self.has_tool_format = bool(self.tool_schemas) and self._renders_tools()
        base_text = self._render(self._base(), add_generation_prompt=False)
        end_text, end_at = self._end_token_after_assistant(base_text)
        self.end_of_turn_id = int(tokenizer.convert_tokens_to_ids(end_text))
        """The token the template writes after an assistant message (ChatML: <|im_end|>)."""
        self.end_of_turn_ids: set[int] = {self.end_of_turn_id}
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            self.end_of_turn_ids.add(int(eos))
        self.separator: str = base_text[end_at:]
        """What the template writes after an assistant message's end token ("\\n" in ChatML)."""
        self._cuts: dict[tuple[str, ...], list[int]] = {}
        # Fail at construction, not at the first observation of the first episode.
        self.observation_ids([{"role": "user", "content": _BASE_USER}])

    # -- rendering --------------------------------------------------------------------------

    def _render(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        kwargs = {"tools": self.tool_schemas} if self.has_tool_format else {}
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def _encode(self, text: str) -> list[int]:
        # The rendered text already holds the template's special tokens (BOS included).
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _renders_tools(self) -> bool:
        probe = [{"role": "user", "content": _BASE_USER}]
        with_tools = self.tokenizer.apply_chat_template(
            probe, tools=self.tool_schemas, tokenize=False, add_generation_prompt=True
        )
        without = self.tokenizer.apply_chat_template(
            probe, tokenize=False, add_generation_prompt=True
        )
        return with_tools != without

    def _end_token_after_assistant(self, base_text: str) -> tuple[str, int]:
        """The first special token the template writes after the base assistant's content,
        and where it ends in the text."""
        after = base_text.rindex(_BASE_ASSISTANT) + len(_BASE_ASSISTANT)
        specials = set(getattr(self.tokenizer, "all_special_tokens", []))
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        specials.update(t.content for t in decoder.values() if getattr(t, "special", False))
        found = [(base_text.find(s, after), -len(s), s) for s in specials if s]
        found = [f for f in found if f[0] >= 0]
        if not found:
            raise RenderError(
                "the chat template writes no special token after an assistant message, so the "
                "end of a student turn cannot be told from its text"
            )
        at, _, token = min(found)
        return token, at + len(token)

    def _base(self, tool_names: tuple[str, ...] = ()) -> list[dict]:
        """The fixed base conversation. When the new messages start with tool results and the
        template has a tool format, its assistant message carries matching (empty) tool calls,
        since some templates head a tool result after the call that asked for it."""
        assistant: dict = {"role": "assistant", "content": _BASE_ASSISTANT}
        if tool_names:
            assistant["tool_calls"] = [
                {"type": "function", "function": {"name": name, "arguments": {}}}
                for name in tool_names
            ]
        return [{"role": "user", "content": _BASE_USER}, assistant]

    def _base_cut(self, tool_names: tuple[str, ...]) -> list[int]:
        """The base's ids up to and including its assistant's end-of-turn token."""
        if tool_names not in self._cuts:
            ids = self._encode(self._render(self._base(tool_names), add_generation_prompt=False))
            ends = [i for i, t in enumerate(ids) if t in self.end_of_turn_ids]
            if not ends:
                raise RenderError("the chat template's base conversation holds no end token")
            self._cuts[tool_names] = ids[: ends[-1] + 1]
        return self._cuts[tool_names]

    # -- the API the trainer calls -------------------------------------------------------------

    def opening_messages(self, messages: list[dict]) -> list[dict]:
        """The opening messages as rendered: with the tool instructions in the system message
        when the template has no tool format (see the class docstring). Not modified in place."""
        if self.has_tool_format:
            return [dict(m) for m in messages]
        return self.text_opening(messages)

    def text_opening(self, messages: list[dict]) -> list[dict]:
        """The opening messages as plain text for another model's template (a teacher of
        another tokenizer): the tool instructions always in the system message, since the
        other template may have no tool format, or another one."""
        messages = [dict(m) for m in messages]
        if not self.tool_schemas:
            return messages
        instructions = tag_format_instructions(self.tool_schemas)
        if messages and messages[0].get("role") == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{instructions}"
            return messages
        return [{"role": "system", "content": instructions}, *messages]

    def opening_ids(self, messages: list[dict]) -> list[int]:
        """The episode's first prompt: the opening messages through the chat template (with
        the tools: the template's format, or the instructions) and the generation prompt."""
        opening = self.opening_messages(messages)
        return self._encode(self._render(opening, add_generation_prompt=True))

    def observation_ids(self, messages: list[dict]) -> list[int]:
        """The ids to append after the student's end-of-turn token so that the next assistant
        turn can start: the template's separator after an assistant message (ChatML: "\\n"),
        the new messages, then the generation prompt.

        How: render a fixed base conversation (a user message and an assistant message) alone,
        and again followed by `messages` with the generation prompt; cut the base's ids after
        its assistant's end token; the ids of the second rendering past that cut are the answer.
        Why this is correct: what a template writes for a message depends on that message and
        what is around it, not on the assistant's words; so the suffix after *any* assistant
        turn's end token is the suffix after the base assistant's, and the student's own tokens
        are never re-rendered. It assumes (1) the template is prefix-stable on the base: adding
        messages does not change how the earlier ones render (checked on every call: RenderError
        if not); (2) the new messages render the same after the base assistant as after the
        student's (true unless the template looks back at an earlier message's content, e.g. a
        tool result headed by the name of the call that asked for it: the base assistant then
        carries calls named after the tool messages); (3) the student's turn ended with the
        template's end token (a truncated turn did not: end the episode there).
        """
        tool_names: tuple[str, ...] = ()
        if self.has_tool_format and messages and messages[0].get("role") == "tool":
            leading = []
            for m in messages:
                if m.get("role") != "tool":
                    break
                leading.append(str(m.get("name", "")))
            tool_names = tuple(leading)
        cut = self._base_cut(tool_names)
        full = self._encode(
            self._render([*self._base(tool_names), *messages], add_generation_prompt=True)
        )
        if full[: len(cut)] != cut:
            at = next(
                (i for i, (a, b) in enumerate(zip(cut, full, strict=False)) if a != b),
                min(len(cut), len(full)),
            )
            raise RenderError(
                "the chat template is not prefix-stable: appending messages changes how the "
                f"earlier turns render (from token {at} on), so new messages cannot be appended "
                "to an episode's ids without re-rendering turns the student already sampled; "
                "use a template that renders earlier turns the same whatever follows"
            )
        return full[len(cut) :]

    def parse(self, completion_ids: list[int], truncated: bool) -> AssistantTurn:
        """A student turn (its sampled ids, end token included unless truncated) as an
        `AssistantTurn`: decoded without special tokens, tool calls in the tag format."""
        text = self.tokenizer.decode(list(completion_ids), skip_special_tokens=True)
        return parse_assistant_text(text, truncated=truncated)
