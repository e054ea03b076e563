"""The answer verifiers on constructed completions: equivalent forms accepted, wrong answers
rejected, and an answer that cannot be extracted reported as such (never hidden as "wrong")."""

from __future__ import annotations

import threading
from fractions import Fraction
from pathlib import Path

import pytest

from opd.client.evaluation.verifiers import (
    VERIFIERS,
    RegexVerifier,
    Verdict,
    extract_final_answer,
    extract_last_number,
    last_boxed,
    load_verifier,
    normalize_answer,
    parse_number,
    verify_exact,
    verify_math,
    verify_numeric,
)

# --- Verdict ---------------------------------------------------------------------------------


def test_verdict_failure_is_never_correct() -> None:
    failed = Verdict.failed("no answer found")
    assert failed.extracted is None and not failed.correct and failed.extraction_failed
    assert failed.error == "no answer found"
    with pytest.raises(ValueError, match="extracted"):
        Verdict(correct=True, extracted=None)


# --- math ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        (r"So the result is \boxed{\frac{1}{2}}.", "0.5"),
        (r"\boxed{1/2}", r"\frac{1}{2}"),
        (r"We get $\sqrt{4}$", "2"),
        (r"Hence $\dfrac{3}{4}$.", "0.75"),
        (r"\boxed{\dfrac{3}{4}}", "0.75"),
        (r"\boxed{0.75}", r"\frac{3}{4}"),
        (r"The area is $2\pi$", r"2\pi"),
        (r"\boxed{x^2 + 1}", "1 + x^2"),
        ("The answer is 1,234", "1234"),
        (r"\boxed{3}", r"$\boxed{3}$"),
    ],
)
def test_math_accepts_equivalent_forms(completion: str, gold: str) -> None:
    v = verify_math(completion, gold)
    assert v.correct, v
    assert v.extracted is not None and v.error is None


def test_math_rejects_a_wrong_answer() -> None:
    v = verify_math(r"\boxed{3}", "4")
    assert not v.correct
    assert v.extracted == "3" and v.error is None


def test_math_gold_is_read_whole_not_as_its_last_number() -> None:
    # Plain-text parsing of "2\pi" would give 2 and accept a wrong "2": the gold is read as LaTeX.
    assert not verify_math(r"\boxed{2}", r"2\pi").correct
    assert not verify_math(r"\boxed{5}", "3, 5").correct
    assert verify_math(r"\boxed{3, 5}", "3, 5").correct


def test_math_unparseable_output_is_an_extraction_failure() -> None:
    v = verify_math("I don't know", "5")
    assert v == Verdict(correct=False, extracted=None, error="no answer found")
    # A bare \dfrac outside $...$ or \boxed is not extracted by math_verify.
    assert verify_math(r"\dfrac{3}{4}", "0.75").extracted is None


def test_math_uses_the_last_answer() -> None:
    # Answers far apart in prose: the last one counts (rightmost match wins).
    text = (
        r"First guess: \boxed{3}. Let me double-check the arithmetic more carefully before "
        r"committing to anything. So the answer is \boxed{5}."
    )
    assert verify_math(text, "5").correct
    assert not verify_math(text, "3").correct
    assert verify_math("We try $3$ first and end with $5$", "5").correct
    # A "final answer is" statement outranks an earlier box.
    assert verify_math(r"Maybe \boxed{3}. Actually the final answer is $5$.", "5").correct


def test_math_boxes_close_together_are_one_set() -> None:
    # math_verify's multi-answer rule: boxes under 10 characters apart are read as a set, so a
    # model hedging between two boxed answers matches neither.
    v = verify_math(r"\boxed{3} or maybe \boxed{5}", "5")
    assert not v.correct and v.extracted == "3,5"
    assert verify_math(r"\boxed{3} and \boxed{5}", "3, 5").correct


def test_math_bad_gold_is_a_data_set_error() -> None:
    with pytest.raises(ValueError, match="gold answer"):
        verify_math(r"\boxed{1}", "")


def test_math_works_outside_the_main_thread() -> None:
    results: list[Verdict | BaseException] = []

    def work() -> None:
        try:
            results.append(verify_math(r"\boxed{\frac{1}{2}}", "0.5"))
        except BaseException as e:  # the test reports it below
            results.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert len(results) == 1 and isinstance(results[0], Verdict) and results[0].correct


# --- exact -----------------------------------------------------------------------------------


def test_exact_extraction_order() -> None:
    assert extract_final_answer(r"so \boxed{a} then \boxed{\text{Paris}}. Done") == r"\text{Paris}"
    assert extract_final_answer("The answer is Rome. Answer: Paris\nthe end") == "Paris"
    assert extract_final_answer("The answer is:\n\n  Rome  \n") == "Rome"
    assert extract_final_answer("thinking...\n\nParis\n\n") == "Paris"
    assert extract_final_answer("") is None
    assert extract_final_answer("   \n ") is None
    assert extract_final_answer(r"working \boxed{4") is None  # truncated box: no answer yet
    assert last_boxed(r"\boxed{\frac{a}{b}} and \fbox{x{y}z}") == "x{y}z"


def test_exact_normalises_both_sides() -> None:
    assert normalize_answer("  **The  Paris**.  ") == "the paris"
    assert normalize_answer(r"$\text{B}$") == "b"
    assert normalize_answer("(1, 2)") != normalize_answer("[1, 2]")
    assert verify_exact("The answer is **Paris**.", "paris").correct
    assert verify_exact(r"\boxed{\text{B}}", "B").correct
    assert verify_exact("Answer: new   york", "New York").correct
    v = verify_exact("The answer is Rome.", "Paris")
    assert not v.correct and v.extracted == "Rome."
    assert verify_exact("", "Paris") == Verdict.failed("no answer found")
    with pytest.raises(ValueError, match="gold answer"):
        verify_exact("Paris", " . ")


# --- numeric ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 12 apples and 1,234 pears", "1,234"),
        ("total: -5 degrees", "-5"),
        ("x = −7", "−7"),
        ("about 3.25.", "3.25"),
        ("ratio 3/4.", "3/4"),
        ("it is 1.5e-3 m", "1.5e-3"),
        (r"half: -\frac{1}{2}", r"-\frac{1}{2}"),
        ("5-3", "3"),
        ("version v1.2.3 of H2O", None),
        ("8lizzers", None),  # glued on the right: a word, not a number
        ("101rom and 3.5kg", None),
        ("12apples, then 7.", "7"),
        ("about 42%", "42"),
        ("no digits here", None),
        ("1,2345", "2345"),
    ],
)
def test_last_number_forms(text: str, expected: str | None) -> None:
    assert extract_last_number(text) == expected


def test_parse_number_values() -> None:
    assert parse_number("1,234.5") == Fraction(2469, 2)
    assert parse_number("3/4") == Fraction(3, 4)
    assert parse_number(r"-\dfrac{1}{2}") == Fraction(-1, 2)
    assert parse_number("1.5e-3") == Fraction(3, 2000)
    assert parse_number(".5") == Fraction(1, 2)
    assert parse_number("3/0") is None
    assert parse_number("1e5000") is None
    assert parse_number("abc") is None


def test_numeric_correct_and_wrong() -> None:
    assert verify_numeric("She has 3 cats, then 1,234 dollars.", "1234").correct
    assert verify_numeric("The temperature is -12.", "-12").correct
    assert verify_numeric("The share is 3/4", "0.75").correct
    assert verify_numeric("The share is 0.75", "3/4").correct
    assert verify_numeric(r"\boxed{72}", "72.0").correct
    v = verify_numeric("first 72, then 73", "72")
    assert not v.correct and v.extracted == "73"
    assert verify_numeric("The answer is 12", "-12").correct is False


def test_numeric_tolerance_edges() -> None:
    # default abs_tol = 1e-6: within it passes, beyond fails
    assert verify_numeric("0.3", "0.3000009").correct
    assert not verify_numeric("0.3", "0.300002").correct
    # rel_tol dominates for large golds: 1e-9 * 1e9 = 1
    assert verify_numeric("1000000001", "1e9").correct
    assert not verify_numeric("1000000002", "1e9").correct
    # exactly on the boundary counts (<=); exact arithmetic, no float rounding
    assert verify_numeric("1.5", "1", abs_tol=0.5).correct
    assert not verify_numeric("1.5000001", "1", abs_tol=0.5).correct
    assert verify_numeric("110", "100", abs_tol=0, rel_tol=0.1).correct
    assert not verify_numeric("0.1", "0.1000001", abs_tol=0, rel_tol=0).correct
    with pytest.raises(ValueError, match="tolerances"):
        verify_numeric("1", "1", abs_tol=-1)


def test_numeric_failures() -> None:
    assert verify_numeric("I don't know", "3") == Verdict.failed("no number found")
    v = verify_numeric("it is 3/0", "3")
    assert v.extracted is None and v.error is not None and "unparseable" in v.error
    with pytest.raises(ValueError, match="'seven'"):
        verify_numeric("7", "seven")


# --- regex -----------------------------------------------------------------------------------


def test_regex_group_last_match_exact() -> None:
    r = RegexVerifier(r"ANSWER:\s*([A-D])")
    assert r("ANSWER: A ... no wait. ANSWER: C", "c").correct
    v = r("ANSWER: A ... no wait. ANSWER: C", "A")
    assert not v.correct and v.extracted == "C"
    assert r("The answer is C", "C") == Verdict.failed(r"no match for 'ANSWER:\\s*([A-D])'")


def test_regex_whole_match_and_numeric() -> None:
    assert RegexVerifier(r"\d+")("1 then 22", "22").correct  # no groups: the whole match
    r = RegexVerifier(r"####\s*(.+)", "numeric")
    assert r("work...\n#### 1,234 dollars", "1234").correct
    assert not r("#### 12", "13").correct
    v = r("#### none", "3")
    assert v.extracted is None and v.error is not None and "no number" in v.error
    with pytest.raises(ValueError, match="not a number"):
        r("#### 3", "three")


def test_regex_invalid_pattern() -> None:
    with pytest.raises(ValueError, match=r"\(unclosed"):
        RegexVerifier("(unclosed")
    with pytest.raises(ValueError, match="then"):
        RegexVerifier("x", "fuzzy")  # type: ignore[arg-type]


# --- load_verifier ---------------------------------------------------------------------------


def test_load_builtins() -> None:
    assert VERIFIERS == ("math", "exact", "numeric", "regex", "regex-numeric")
    assert load_verifier("math") is verify_math
    assert load_verifier("exact") is verify_exact
    assert load_verifier("numeric") is verify_numeric
    r = load_verifier(r"regex:(?i)answer: (\w+)")
    assert isinstance(r, RegexVerifier) and r.then == "exact"
    assert r("Answer: Paris", "paris").correct
    rn = load_verifier("regex-numeric:#### (.*)")
    assert isinstance(rn, RegexVerifier) and rn.then == "numeric"
    assert rn("#### -4.0", "-4").correct
    assert load_verifier("regex:a:(b)")("a:b", "b").correct  # the pattern keeps its colons


def test_load_errors() -> None:
    with pytest.raises(ValueError, match="math, exact, numeric"):
        load_verifier("fuzzy")
    with pytest.raises(ValueError, match="regex:PATTERN"):
        load_verifier("regex")
    with pytest.raises(ValueError, match="no_such_module_xyz:f"):
        load_verifier("no_such_module_xyz:f")
    with pytest.raises(ValueError, match=r"invalid pattern '\['"):
        load_verifier("regex:[")


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = "opd_test_user_verifiers"
    (tmp_path / f"{name}.py").write_text(
        "from opd.client.evaluation.verifiers import Verdict\n"
        "def as_bool(completion, answer):\n"
        "    return completion.strip().endswith(answer)\n"
        "def as_verdict(completion, answer):\n"
        "    got = completion.split()[-1] if completion.split() else None\n"
        "    if got is None:\n"
        "        return Verdict.failed('empty')\n"
        "    return Verdict(correct=got == answer, extracted=got)\n"
        "def wrong_type(completion, answer):\n"
        "    return 'yes'\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_user_function_returning_bool(user_module: str) -> None:
    v = load_verifier(f"{user_module}:as_bool")
    assert v("  it is 42 ", "42") == Verdict(correct=True, extracted="it is 42", error=None)
    assert not v("it is 41", "42").correct


def test_user_function_returning_verdict(user_module: str) -> None:
    v = load_verifier(f"{user_module}:as_verdict")
    assert v("so 42", "42") == Verdict(correct=True, extracted="42")
    assert v("", "42") == Verdict.failed("empty")


def test_user_function_wrong_type_and_missing(user_module: str) -> None:
    spec = f"{user_module}:wrong_type"
    with pytest.raises(TypeError, match=spec):
        load_verifier(spec)("x", "y")
    with pytest.raises(ValueError, match=f"{user_module}:absent"):
        load_verifier(f"{user_module}:absent")
    with pytest.raises(ValueError, match="not callable"):
        load_verifier(f"{user_module}:NOT_CALLABLE")
