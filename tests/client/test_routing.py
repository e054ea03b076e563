"""Routing prompts to named teachers (opd.client.train.routing): by file, by column, by rule,
and the error for a prompt no rule routes, raised before any training."""

from __future__ import annotations

import pytest

from opd.client.configs.groups import parse_pairs
from opd.client.train.routing import Router, UnroutablePrompts, share


def test_a_column_names_the_teacher_directly_or_through_a_rule() -> None:
    router = Router(("math", "code"), field="domain", rules=(("algebra", "math"),))
    rows = [{"domain": "math"}, {"domain": "code"}, {"domain": "algebra"}]
    assert router.assign(rows) == ["math", "code", "math"]


def test_a_file_rule_wins_over_the_column() -> None:
    router = Router(("math", "code"))
    rows = [{"teacher": "code"}, {"teacher": "code"}]
    assert router.assign(rows, ["math", None]) == ["math", "code"]


def test_one_teacher_takes_every_prompt_without_a_column() -> None:
    assert Router(("only",)).assign([{"prompt": "a"}, {"prompt": "b"}]) == ["only", "only"]


def test_unroutable_prompts_are_an_error_naming_them() -> None:
    router = Router(("math", "code"), field="domain")
    rows = [{"domain": "math"}, {"prompt": "no domain"}, {"domain": "chat"}]
    with pytest.raises(UnroutablePrompts) as info:
        router.assign(rows)
    message = str(info.value)
    assert "2 of 3 prompts" in message
    assert "#1" in message and "#2 (domain='chat')" in message
    assert "--route VALUE=TEACHER" in message


def test_a_rule_to_an_unknown_teacher_is_refused() -> None:
    with pytest.raises(ValueError, match="no teacher named 'physics'"):
        Router(("math",), rules=(("mechanics", "physics"),))


def test_pairs_and_shares() -> None:
    assert parse_pairs(["a=x", " b = y "], "--route") == {"a": "x", "b": "y"}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_pairs(["novalue"], "--route")
    with pytest.raises(ValueError, match="given twice"):
        parse_pairs(["a=x", "a=y"], "--route")
    assert share(["m", "m", "c", "m"], ["m", "c", "z"]) == {"m": 0.75, "c": 0.25, "z": 0.0}
