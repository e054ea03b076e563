"""`CalculatorEnv`: opd's generated arithmetic tasks (client/evaluation/tasks.py) with one tool,
a calculator. The smallest environment where a tool call can change the answer: the student
may compute "7 x 8" itself or ask the tool, and the reward says whether the final answer is
right.

The calculator evaluates + - * / and parentheses on numbers, with `ast` and a whitelist of
node types: never `eval`, so "__import__('os')" or "(1).__class__" is a refused expression,
not code that runs. Arithmetic is exact (fractions), so 0.1 + 0.2 is 0.3.
"""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction

from opd.client.episodes.base import ToolEnvironment
from opd.client.episodes.turns import AssistantTurn
from opd.client.evaluation.verifiers import verify_numeric

MAX_EXPRESSION_CHARS = 200
_MAX_DIGITS = 60  # a result beyond this is refused rather than printed (no answer is that big)
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
# "3 x 4" and "3 × 4" as students and the task prompts write them; "÷" for division.
_TIMES = re.compile(r"(?<=[\d)\s])[x×](?=[\s\d(])")

SYSTEM_PROMPT = (
    "You are a careful assistant. Use the calculator tool for arithmetic, then give the final "
    "answer as just the number."
)


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    raise ValueError(
        f"unsupported expression part {type(node).__name__}: only numbers, + - * / and "
        "parentheses are allowed"
    )


def _format(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.10g}"


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with +, -, *, / and parentheses.

    Args:
        expression: The arithmetic expression to evaluate, for example "(3 + 4) * 2".

    Returns:
        The value of the expression.
    """
    if not isinstance(expression, str):
        raise ValueError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    text = _TIMES.sub("*", expression.replace("÷", "/")).strip()
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from e
    value = _evaluate(tree.body)
    if max(len(str(abs(value.numerator))), len(str(value.denominator))) > _MAX_DIGITS:
        raise ValueError("the result is too large")
    return _format(value)


class CalculatorEnv(ToolEnvironment):
    """A generated arithmetic task (rows {"prompt", "answer"}, e.g. `task:multiplication`)
    with the calculator tool. Reward 1.0 when the last number of the final turn equals the
    row's answer (the `numeric` verifier, as `opd eval` grades these tasks), else 0.0."""

    def __init__(self, *, max_tool_calling_iterations: int | None = 4) -> None:
        super().__init__([calculator], max_tool_calling_iterations=max_tool_calling_iterations)
        self.answer: str | None = None

    def reset(self, row: dict) -> list[dict]:
        if "prompt" not in row or "answer" not in row:
            raise ValueError(f"calculator rows need 'prompt' and 'answer', got {sorted(row)}")
        self.answer = str(row["answer"])
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": str(row["prompt"])},
        ]

    def reward(self, turn: AssistantTurn) -> float:
        if self.answer is None:
            raise RuntimeError("CalculatorEnv.step before reset")
        return 1.0 if verify_numeric(turn.text, self.answer).correct else 0.0
