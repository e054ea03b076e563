"""opd.client.episodes: the environment side of multi-turn / tool-use OPD.

Light: no server and no model weights, only SmolLM2's real tokenizer (its ChatML template has
no tool format; a template with one is built in-test on a copy of it).
"""

from __future__ import annotations

import copy
import re

import pytest
from transformers import AutoTokenizer

from opd.client.episodes import (
    MALFORMED,
    AssistantTurn,
    CalculatorEnv,
    Environment,
    EpisodeError,
    FollowupEnv,
    FunctionToolsEnv,
    Observation,
    RenderError,
    ToolCall,
    ToolEnvironment,
    TRLEnvironment,
    TurnRenderer,
    calculator,
    execute_tool_call,
    format_tool_call,
    load_environment,
    parse_assistant_text,
    parse_error,
    parse_tool_calls,
    tool_schema,
)
from opd.client.evaluation.tasks import task_rows
from opd.modeling.embedded import embedded_model_dir


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(embedded_model_dir())


def _tok_with(tok, template: str):
    other = copy.deepcopy(tok)
    other.chat_template = template
    return other


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


def explode(reason: str) -> str:
    """Always fail.

    Args:
        reason: Why.
    """
    raise RuntimeError(f"boom: {reason}")


def _ids(tok, text: str, end: bool = True) -> list[int]:
    """A student turn as sampled: content tokens, then <|im_end|>."""
    return tok.encode(text, add_special_tokens=False) + ([tok.eos_token_id] if end else [])


# ------------------------------------------------------------------------------------------
# the tag format
# ------------------------------------------------------------------------------------------


def test_tag_parsing_several_calls_in_order():
    text = (
        "Let me compute.\n"
        + format_tool_call("calculator", {"expression": "3 * 4"})
        + '\n<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}", "id": "c7"}\n'
        "</tool_call>"
    )
    turn = parse_assistant_text(text)
    assert turn.text == text and turn.truncated is False
    assert turn.tool_calls == [
        ToolCall("calculator", {"expression": "3 * 4"}),
        ToolCall("add", {"a": 1, "b": 2}, id="c7"),
    ]


def test_no_tag_is_no_call():
    assert parse_tool_calls("The answer is 12.") == []
    assert parse_tool_calls('{"name": "add", "arguments": {}}') == []  # JSON without the tag


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ('{"name": "add", "arguments": {"a": 1,', "does not parse"),
        ('["add"]', "not an object"),
        ('{"arguments": {}}', '"name"'),
        ('{"name": "add", "arguments": [1, 2]}', '"arguments" is not an object'),
    ],
)
def test_malformed_tag_becomes_a_marked_call(body, why):
    good = format_tool_call("add", {"a": 1, "b": 2})
    calls = parse_tool_calls(f"<tool_call>{body}</tool_call> then {good}")
    assert calls[0].name == MALFORMED and why in parse_error(calls[0])
    assert calls[0].arguments["text"].startswith("<tool_call>")
    assert calls[1] == ToolCall("add", {"a": 1, "b": 2}) and parse_error(calls[1]) is None


def test_unclosed_tag_is_malformed_unless_the_turn_was_truncated():
    text = 'Sure. <tool_call>{"name": "add", "argu'
    [call] = parse_tool_calls(text)
    assert call.name == MALFORMED and "never closed" in parse_error(call)
    assert parse_tool_calls(text, truncated=True) == []


def test_tool_schema_from_a_plain_function():
    schema = tool_schema(calculator)
    fn = schema["function"]
    assert schema["type"] == "function" and fn["name"] == "calculator"
    assert fn["parameters"]["properties"]["expression"]["type"] == "string"
    assert fn["parameters"]["required"] == ["expression"]
    assert tool_schema(add)["function"]["parameters"]["properties"]["a"]["type"] == "integer"

    def undocumented(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="tool 'undocumented'.*docstring"):
        tool_schema(undocumented)


# ------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------


def test_smollm2_has_no_tool_format_so_the_tools_go_into_the_system_message(tok):
    r = TurnRenderer(tok, [calculator, add])
    assert not r.has_tool_format
    assert r.end_of_turn_ids == {tok.convert_tokens_to_ids("<|im_end|>")}
    assert r.separator == "\n"
    text = tok.decode(r.opening_ids([{"role": "user", "content": "What is 3 x 4?"}]))
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou can call these tools:\n<tools>\n")
    assert '"name": "calculator"' in system and '"name": "add"' in system
    assert (
        '<tool_call>{"name": "TOOL_NAME", "arguments": {"ARGUMENT": VALUE}}</tool_call>' in system
    )
    assert "SmolLM" not in text  # our system message replaces the template's default one
    assert text.endswith("<|im_start|>user\nWhat is 3 x 4?<|im_end|>\n<|im_start|>assistant\n")

    # An existing system message is extended, after a blank line.
    opening = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.decode(r.opening_ids(opening))
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou can call these tools:")
    assert opening[0]["content"] == "Be brief."  # not modified in place

    # Without tools, nothing is added.
    plain = TurnRenderer(tok)
    assert plain.opening_ids(opening[1:]) == tok.apply_chat_template(
        opening[1:], add_generation_prompt=True, tokenize=True, return_dict=False
    )


TOOL_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\n# Tools\\n' }}"
    "{%- for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{%- endfor %}"
    "{{ '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{%- if message.tool_calls is defined %}{%- for call in message.tool_calls %}"
    "{{ '<tool_call>' + call.function.name + '</tool_call>' }}{%- endfor %}{%- endif %}"
    "{{ '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_template_with_a_tool_format_renders_the_tools_itself(tok):
    tool_tok = _tok_with(tok, TOOL_TEMPLATE)
    r = TurnRenderer(tool_tok, [calculator])
    assert r.has_tool_format
    opening = [{"role": "user", "content": "What is 3 x 4?"}]
    text = tool_tok.decode(r.opening_ids(opening))
    assert text.startswith("<|im_start|>system\n# Tools\n{")
    assert "You can call these tools" not in text and '"name": "calculator"' in text
    assert r.opening_ids(opening) == tool_tok.apply_chat_template(
        opening, tools=[calculator], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    tool_msg = {"role": "tool", "name": "calculator", "content": "12"}
    assert tool_tok.decode(r.observation_ids([tool_msg])) == (
        "\n<|im_start|>tool\n12<|im_end|>\n<|im_start|>assistant\n"
    )


def test_turn_by_turn_ids_equal_the_whole_conversation_on_chatml(tok):
    """Token-in/token-out on a prefix-stable template: opening + student ids + observation ids
    + ... is what the template makes of the whole conversation."""
    r = TurnRenderer(tok, [calculator])
    env = CalculatorEnv()
    row = {"prompt": "What is 7 x 8? Answer with just the number.", "answer": 56}
    opening = env.reset(row)
    ids = r.opening_ids(opening)
    conversation = r.opening_messages(opening)
    for text in (format_tool_call("calculator", {"expression": "7 * 8"}), "56"):
        turn_ids = _ids(tok, text)
        ids += turn_ids
        conversation.append({"role": "assistant", "content": text})
        obs = env.step(r.parse(turn_ids, truncated=False))
        if obs.done:
            break
        ids += r.observation_ids(obs.messages)
        conversation += obs.messages
    assert obs.done and obs.reward == 1.0
    assert conversation[3] == {"role": "tool", "name": "calculator", "content": "56"}
    whole = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    assert tok.decode(ids) + "\n" == whole  # the template's separator follows the last turn
    assert ids + tok.encode("\n") == tok(whole, add_special_tokens=False)["input_ids"]

    # One more question after the last answer, as FollowupEnv asks: the next prompt too.
    user = {"role": "user", "content": "Now add 2."}
    ids += r.observation_ids([user])
    whole = tok.apply_chat_template(
        [*conversation, user], add_generation_prompt=True, tokenize=False
    )
    assert tok.decode(ids) == whole


THINK_TEMPLATE = (  # Qwen3-like: earlier turns lose their reasoning, so not prefix-stable
    "{%- for message in messages %}{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' and not loop.last and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip() %}{%- endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_template_that_is_not_prefix_stable_still_appends_the_fixed_base_suffix(tok):
    think_tok = _tok_with(tok, THINK_TEMPLATE)
    r = TurnRenderer(think_tok)
    opening = [{"role": "user", "content": "What is 2 + 2?"}]
    student = _ids(think_tok, "<think>two and two</think> 4")
    user = {"role": "user", "content": "Now add 1."}
    obs_ids = r.observation_ids([user])
    assert (
        think_tok.decode(obs_ids)
        == "\n<|im_start|>user\nNow add 1.<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = r.opening_ids(opening) + student + obs_ids
    assert "<think>two and two</think> 4<|im_end|>" in think_tok.decode(ids)  # what was sampled
    rerender = think_tok.apply_chat_template(
        [*opening, {"role": "assistant", "content": "<think>two and two</think> 4"}, user],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert "<think>" not in rerender and think_tok.decode(ids) != rerender


def test_a_template_unstable_on_the_base_is_refused(tok):
    counting = (
        "{{ '<|im_start|>system\\n' + (messages | length | string) + ' messages<|im_end|>\\n' }}"
        "{%- for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    with pytest.raises(RenderError, match="not prefix-stable"):
        TurnRenderer(_tok_with(tok, counting))


def test_parse_decodes_without_special_tokens_and_keeps_truncation(tok):
    r = TurnRenderer(tok, [add])
    call = format_tool_call("add", {"a": 2, "b": 3})
    turn = r.parse(_ids(tok, f"Adding. {call}"), truncated=False)
    assert turn == AssistantTurn(f"Adding. {call}", [ToolCall("add", {"a": 2, "b": 3})], False)
    cut = r.parse(_ids(tok, 'Adding. <tool_call>{"name": "ad', end=False), truncated=True)
    assert cut.truncated and cut.tool_calls == [] and "<|im_end|>" not in cut.text


# ------------------------------------------------------------------------------------------
# environments
# ------------------------------------------------------------------------------------------


class TwoTools(ToolEnvironment):
    def __init__(self, **kwargs):
        super().__init__([add, explode], **kwargs)

    def reset(self, row: dict) -> list[dict]:
        return [{"role": "user", "content": row["prompt"]}]

    def reward(self, turn: AssistantTurn) -> float:
        return 1.0 if "5" in turn.text else 0.0


def test_tool_environment_answers_mistakes_with_error_messages():
    env = TwoTools()
    calls = [
        ToolCall("add", {"a": 2, "b": 3}, id="c1"),
        ToolCall("subtract", {"a": 1}),
        ToolCall("add", {"a": 2}),
        ToolCall("explode", {"reason": "test"}),
        parse_tool_calls("<tool_call>{oops</tool_call>")[0],
    ]
    obs = env.step(AssistantTurn("...", calls, False))
    assert obs.done is False and obs.reward is None
    assert obs.messages[0] == {"role": "tool", "name": "add", "content": "5", "tool_call_id": "c1"}
    contents = [m["content"] for m in obs.messages]
    assert contents[1] == "Error: unknown tool 'subtract'. Available tools: add, explode."
    assert contents[2].startswith("Error: bad arguments for add: missing a required argument")
    assert "Expected add(a: int, b: int) -> int" in contents[2]
    assert contents[3] == "Error: explode failed: RuntimeError: boom: test"
    assert contents[4].startswith("Error: could not read the tool call: the JSON inside")
    assert "name" not in obs.messages[4]
    assert (env.tool_calls, env.tool_errors) == (5, 4)

    end = env.step(AssistantTurn("It is 5.", [], False))
    assert end == Observation(messages=[], done=True, reward=1.0)


def test_tool_environment_ends_on_truncation_and_after_the_iteration_limit():
    call = [ToolCall("add", {"a": 1, "b": 1})]
    assert TwoTools().step(AssistantTurn("cut", call, True)).done  # truncated: ends, rewarded
    env = TwoTools(max_tool_calling_iterations=2)
    assert [env.step(AssistantTurn("", call, False)).done for _ in range(3)] == [False, False, True]
    with pytest.raises(ValueError, match="unique"):
        FunctionToolsEnv([add, add])


def test_execute_tool_call_formats_results():
    def info(key: str) -> dict:
        """Look up.

        Args:
            key: The key.
        """
        return {"key": key, "value": [1, 2]}

    result = execute_tool_call(ToolCall("info", {"key": "k"}), {"info": info})
    assert result.ok and result.message["content"] == '{"key": "k", "value": [1, 2]}'


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("(3 + 4) * 2", "14"),
        ("7 x 8", "56"),
        ("7×8", "56"),
        ("-3 + 10 / 4", "-0.5"),
        ("0.1 + 0.2", "0.3"),
        ("1 / 3", "0.3333333333"),
        ("12 ÷ 4", "3"),
        (" 42 ", "42"),
    ],
)
def test_calculator_evaluates_arithmetic(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("__import__('os').system('true')", "Call"),
        ("(1).__class__", "Attribute"),
        ("x + 1", "Name"),
        ("2 ** 10", "BinOp"),
        ("[1, 2]", "List"),
        ("True + 1", "Constant"),
        ("1 / 0", "division by zero"),
        ("1 +", "not an arithmetic expression"),
        ("1+" * 150 + "1", "longer than"),
    ],
)
def test_calculator_refuses_anything_but_arithmetic(expression, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        calculator(expression)


def test_calculator_env_on_a_generated_task():
    row = task_rows("task:multiplication:eval")[0]
    env = CalculatorEnv()
    assert isinstance(env, Environment)
    opening = env.reset(row)
    assert opening[-1] == {"role": "user", "content": row["prompt"]}
    q = row["prompt"].split("What is ")[1].split("?")[0]
    obs = env.step(parse_assistant_text(format_tool_call("calculator", {"expression": q})))
    assert obs.messages == [{"role": "tool", "name": "calculator", "content": str(row["answer"])}]
    evil = env.step(
        parse_assistant_text(format_tool_call("calculator", {"expression": "__import__('os')"}))
    )
    assert evil.messages[0]["content"].startswith(
        "Error: calculator failed: ValueError: unsupported"
    )
    assert env.step(AssistantTurn(f"The answer is {row['answer']}.", [], False)).reward == 1.0
    env.reset(row)
    assert env.step(AssistantTurn(f"{row['answer'] + 1}", [], False)).reward == 0.0


def _followup_answer(question: str, value: int) -> int:
    kind, d = re.search(
        r"(Add|add|Subtract|subtract|Multiply|multiply|Divide|divide)\D*(\d)", question
    ).groups()
    return {
        "add": value + int(d),
        "subtract": value - int(d),
        "multiply": value * int(d),
        "divide": value // int(d),
    }[kind.lower()]


def test_followup_runs_its_turns_grades_them_and_is_deterministic():
    row = {"prompt": "anything", "answer": 12}
    env = FollowupEnv(turns=5)
    opening = env.reset(row)
    first = opening[-1]["content"]
    assert re.match(r"Start with \d\. .+ Answer with just the number\.$", first)
    assert FollowupEnv(turns=5).reset(row) == opening  # deterministic given the row
    assert any(FollowupEnv(turns=5, seed=s).reset(row) != opening for s in (1, 2, 3))
    assert FollowupEnv(turns=5).reset({"prompt": "other"}) != opening
    value = int(re.search(r"Start with (\d)", first).group(1))
    question, answers = first, ["wrong", None, None, "7777", None]
    for k, given in enumerate(answers):
        value = _followup_answer(question.split("Now")[-1], value)
        assert 0 <= value <= 99 and value == env.values[k]
        obs = env.step(AssistantTurn(str(value) if given is None else given, [], False))
        if k < len(answers) - 1:
            assert not obs.done and obs.messages[0]["role"] == "user"
            question = obs.messages[0]["content"]
            if given is not None:  # the correct value is stated, so "that" is unambiguous
                assert question.startswith(f"That is not right: it is {value}. Now ")
            else:
                assert question.startswith("Now ")
    assert obs.done and env.turn_correct == [False, True, True, False, True]
    assert obs.reward == pytest.approx(3 / 5)


def test_followup_truncated_turn_ends_the_episode_with_the_turns_left_counted_wrong():
    env = FollowupEnv()
    env.reset({"prompt": "p"})
    obs = env.step(AssistantTurn(str(env.values[0]), [], False))
    assert not obs.done
    obs = env.step(AssistantTurn("I think the", [], True))
    assert obs.done and obs.reward == pytest.approx(1 / 6) and env.turn_correct == [True, False]


def test_episode_error_names_the_environment_episode_and_turn():
    err = EpisodeError("calculator", 3, 2, KeyError("answer"))
    assert str(err) == "environment calculator raised at episode 3, turn 2: KeyError: 'answer'"
    assert (err.episode, err.turn) == (3, 2) and err.__cause__ is err.cause


# ------------------------------------------------------------------------------------------
# TRL
# ------------------------------------------------------------------------------------------


class CounterEnv:
    """A TRL environment_factory class as TRL's docs write one: public methods are tools."""

    def __init__(self, start: int = 0):
        self.start = start
        self.counter = start
        self.reset_kwargs: dict | None = None

    def reset(self, **kwargs) -> str | None:
        self.reset_kwargs = kwargs
        self.counter = self.start
        return f" The counter starts at {self.counter}."

    def increment(self, step: int) -> int:
        """Increment the counter.

        Args:
            step: How much to add.

        Returns:
            The new value of the counter.
        """
        self.counter += step
        return self.counter

    def get_reward(self) -> float:
        return float(self.counter == 3)

    def _helper(self) -> None:
        """Private: not a tool."""

    @property
    def doubled(self) -> int:
        raise AssertionError("properties are not evaluated")


def test_trl_environment_wraps_a_factory_instance_like_grpo_does(tok):
    env = TRLEnvironment(CounterEnv())
    assert [fn.__name__ for fn in env.tools] == ["increment"]
    row = {"prompt": [{"role": "user", "content": "Count to 3."}], "target": 3}
    opening = env.reset(row)
    assert opening == [{"role": "user", "content": "Count to 3. The counter starts at 0."}]
    assert env.instance.reset_kwargs == row and row["prompt"][0]["content"] == "Count to 3."
    # A string prompt (opd's prompt sets) is one user message.
    assert env.reset({"prompt": "Count."})[0]["content"] == "Count. The counter starts at 0."
    obs = env.step(parse_assistant_text(format_tool_call("increment", {"step": 3})))
    assert obs.messages == [{"role": "tool", "name": "increment", "content": "3"}]
    assert env.step(AssistantTurn("Done.", [], False)).reward == 1.0
    # The bound methods render like any tool.
    r = TurnRenderer(tok, env.tools)
    assert '"name": "increment"' in tok.decode(r.opening_ids(opening))


def test_trl_adapters_refuse_what_they_cannot_wrap():
    class AsyncTool(CounterEnv):
        async def fetch(self, url: str) -> str:
            """Fetch.

            Args:
                url: Where.
            """
            return url

    with pytest.raises(ValueError, match="'fetch' is async"):
        TRLEnvironment(AsyncTool())
    with pytest.raises(ValueError, match="no reset"):
        TRLEnvironment(object())


def test_function_tools_env_takes_trl_tools_unchanged():
    env = FunctionToolsEnv([add], max_tool_calling_iterations=1)
    assert env.tools == [add]
    assert env.reset({"prompt": "Add 2 and 3."}) == [{"role": "user", "content": "Add 2 and 3."}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "5"},
    ]
    assert env.reset({"messages": messages}) == messages[:2]
    call = parse_assistant_text(format_tool_call("add", {"a": 2, "b": 3}))
    assert env.step(call).messages[0]["content"] == "5"
    assert env.step(call) == Observation([], done=True, reward=None)  # limit reached
    with pytest.raises(ValueError, match="neither 'prompt' nor 'messages'"):
        env.reset({"question": "?"})


# ------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------


def test_load_environment_built_ins_and_module_class():
    calc = load_environment("calculator")
    assert isinstance(calc(), CalculatorEnv) and calc() is not calc()
    follow = load_environment("followup", {"turns": 3, "seed": 7})()
    assert isinstance(follow, FollowupEnv) and (follow.turns, follow.seed) == (3, 7)
    same = load_environment("opd.client.episodes.followup:FollowupEnv", {"turns": 2})()
    assert isinstance(same, FollowupEnv) and same.turns == 2


def test_load_environment_takes_trl_factories_by_prefix_or_shape():
    spec = f"{__name__}:CounterEnv"
    for s in (spec, f"trl:{spec}"):
        env = load_environment(s, {"start": 1, "max_tool_calling_iterations": 2})()
        assert isinstance(env, TRLEnvironment) and env.instance.start == 1
        assert env.max_tool_calling_iterations == 2


def test_load_environment_takes_trl_tool_functions_unchanged():
    factory = load_environment(f"tools:{__name__}:add,explode", {"max_tool_calling_iterations": 3})
    env = factory()
    assert isinstance(env, FunctionToolsEnv) and env.max_tool_calling_iterations == 3
    assert [t.__name__ for t in env.tools] == ["add", "explode"]
    assert env.tools[0] is add  # the user's own function, not a copy


@pytest.mark.parametrize(
    ("spec", "kwargs", "why"),
    [
        ("calc", None, "expected calculator, followup"),
        (f"tools:{__name__}:add,nope", None, "has no function 'nope'"),
        ("tools:no_such_module_xyz:f", None, "cannot import"),
        ("no_such_module_xyz:Env", None, "cannot import 'no_such_module_xyz'"),
        ("opd.client.episodes.followup:Nope", None, "has no attribute 'Nope'"),
        ("opd.client.episodes.calculator:calculator", None, "is not a class"),
        ("opd.client.episodes.turns:ToolCall", None, "has no reset method"),
        ("followup", {"turn": 3}, "bad arguments ['turn']"),
    ],
)
def test_load_environment_bad_specs_name_the_spec(spec, kwargs, why):
    with pytest.raises(ValueError, match=re.escape(f"environment {spec!r}")) as info:
        load_environment(spec, kwargs)
    assert why in str(info.value)
