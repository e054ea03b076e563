"""Answer verifiers: is this completion's final answer the gold answer? Chosen per data set by name.

Every verifier maps (completion, gold answer) to a `Verdict`. A verdict separates "the model
answered, and was wrong" from "no answer could be pulled out of the text": `extracted is None`
marks an extraction failure, which is always scored incorrect but which callers count on its
own, because a rise in failures (truncation, a changed output format) reads very differently
from a fall in accuracy. Data-set problems (a gold answer that is not a number for `numeric`,
an empty gold answer) raise instead: they are not the model's fault and must not be scored.

Built-ins, resolved by `load_verifier`:

  math              math_verify: LaTeX / plain-expression extraction, symbolic equivalence
                    (\\frac{1}{2} == 0.5 == 1/2). Needs `pip install math-verify`.
  exact             the final answer (last \\boxed{...}, else after the last "answer is" /
                    "Answer:", else the last non-empty line), normalised, equal to the gold.
  numeric           the last number in the completion, within a tolerance of the gold number.
  regex:PATTERN     the last match of PATTERN (group 1 if it has groups), compared exactly.
  regex-numeric:PATTERN   the same, compared numerically.
  module.path:function    a user function (completion, answer) -> bool | Verdict.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal, Protocol

import numpy as np

from opd.client.user_code import import_named

VERIFIERS: tuple[str, ...] = ("math", "exact", "numeric", "regex", "regex-numeric")
"""The built-in verifier names (regex and regex-numeric take a pattern: `regex:PATTERN`)."""

_SPEC_HELP = "math, exact, numeric, regex:PATTERN, regex-numeric:PATTERN, or module.path:function"

NO_ANSWER = "no answer found"
NO_NUMBER = "no number found"
UNPARSEABLE = "unparseable"


@dataclass(frozen=True)
class Verdict:
    """The grade of one completion.

    `extracted` is what was pulled out of the completion as its answer, or None when extraction
    failed; `error` then says why ("no answer found", "unparseable: ..."). A failed extraction
    is never correct: the constructor refuses `correct=True` without an extraction, so a
    verifier cannot hide a failure inside the accuracy.
    """

    correct: bool
    extracted: str | None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.extracted is None and self.correct:
            raise ValueError("Verdict: correct=True needs an extracted answer")

    @classmethod
    def failed(cls, error: str) -> Verdict:
        """An extraction failure: nothing to compare, scored incorrect."""
        return cls(correct=False, extracted=None, error=error)

    @property
    def extraction_failed(self) -> bool:
        return self.extracted is None


class Verifier(Protocol):
    """(completion, gold answer) -> Verdict. Raises only for bad gold answers (data-set errors)."""

    def __call__(self, completion: str, answer: str) -> Verdict: ...


# --------------------------------------------------------------------------------------------
# math: math_verify
# --------------------------------------------------------------------------------------------


def _math_verify() -> Any:
    """The math_verify module, imported on first use: it pulls in sympy and latex2sympy, which
    take seconds to import and are not needed by the other verifiers."""
    try:
        import math_verify
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'math' verifier needs the math-verify package: pip install math-verify"
        ) from e
    return math_verify


def _signal_timeout(seconds: int | None) -> int | None:
    """math_verify's timeouts use signal.alarm, which raises ValueError outside the main
    thread; there we run without a timeout (the caller's own deadline must bound the work)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return seconds


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str, timeout: int | None) -> tuple[Any, ...]:
    """The gold answer parsed once per (answer, timeout): every prompt is sampled n times.

    A gold without `$` or `\\boxed` is parsed as inline LaTeX first ($answer$) and only then as
    plain text. Plain-text parsing picks the *last number-like span*, which silently truncates
    real answers ("2\\pi" -> 2, "3, 5" -> 5, "x = 3" -> 3, "(1, 2)" -> 2); inside $...$ the
    whole answer is read as one expression. A tuple is cached (immutable); verify() needs a list.
    """
    mv = _math_verify()
    if "$" in answer or "\\boxed" in answer:
        return tuple(mv.parse(answer, parsing_timeout=timeout))
    parsed = mv.parse(f"${answer}$", parsing_timeout=timeout)
    if not parsed:
        parsed = mv.parse(answer, parsing_timeout=timeout)
    return tuple(parsed)


def _describe(parsed: list[Any]) -> str:
    """The extracted answer as text: math_verify returns [sympy object, matched string]; the
    string is what the model wrote (normalised LaTeX), the better thing to show a person."""
    strings = [p for p in parsed if isinstance(p, str)]
    return strings[-1] if strings else str(parsed[0])


def verify_math(completion: str, answer: str, *, timeout_seconds: int | None = 5) -> Verdict:
    """Symbolic equivalence with math_verify (`parse` with its default LaTeX + expression
    extraction, then `verify(gold, pred)`).

    Which answer is used when several appear (math_verify's rules, not ours): extraction
    patterns are tried by priority, "final answer is X" first, then \\boxed{...}, then
    "answer: X", then any LaTeX or bare number; within one priority the *rightmost* match wins.
    One surprise: \\boxed answers close together (under 10 characters apart, or under 70 with
    a ",", ";", "and" or "or" between them) are read as one set, so "\\boxed{3} then \\boxed{5}"
    extracts {3, 5} and matches neither 3 nor 5; a boxed answer further from the previous
    one replaces it. Bare \\dfrac{a}{b} outside $...$ or \\boxed is not extracted at all.

    `timeout_seconds` bounds each parse and comparison in the main thread (signal.alarm); in
    other threads it is ignored (see _signal_timeout). An unparseable gold answer raises
    ValueError: it is a data-set error.
    """
    mv = _math_verify()
    timeout = _signal_timeout(timeout_seconds)
    gold = list(_parse_gold(answer, timeout))
    if not gold:
        raise ValueError(f"math verifier: gold answer {answer!r} does not parse")
    pred = mv.parse(completion, parsing_timeout=timeout)
    if not pred:
        return Verdict.failed(NO_ANSWER)
    correct = bool(mv.verify(gold, pred, timeout_seconds=timeout))
    return Verdict(correct=correct, extracted=_describe(pred))


# --------------------------------------------------------------------------------------------
# exact: extract the final answer, normalise, compare as text
# --------------------------------------------------------------------------------------------

_ANSWER_ANCHOR = re.compile(r"answer\s+is\b\s*:?|answer\s*:", re.IGNORECASE)
# Surrounding characters that carry no answer: math delimiters, sentence punctuation, markdown
# emphasis and quotes. Brackets stay: (1, 2) and [1, 2] are different answers.
_STRIP_CHARS = " \t\r\n$.,;:!?*\"'`"
_WHITESPACE = re.compile(r"\s+")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...}, braces balanced; None if there is
    none or it is never closed (a truncated completion has no answer yet)."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    while start >= 0:
        i = text.find("{", start)
        if i >= 0 and text[start:i].strip() in ("\\boxed", "\\fbox"):
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
            return None
        # "\boxed" not followed by a brace (e.g. "\boxed 5"): look further left
        start = max(text.rfind("\\boxed", 0, start), text.rfind("\\fbox", 0, start))
    return None


def extract_final_answer(text: str) -> str | None:
    """The default final-answer extractor: the last \\boxed{...} if present, else what follows
    the last "answer is" / "Answer:" (the rest of that line, or the next non-empty line when the
    anchor ends its line), else the last non-empty line. None when nothing is left."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    if "\\boxed{" in text or "\\fbox{" in text:
        return None  # a box was opened and never closed: the completion was cut off
    anchors = list(_ANSWER_ANCHOR.finditer(text))
    if anchors:
        rest = text[anchors[-1].end() :]
        for line in rest.splitlines():
            if line.strip():
                return line.strip()
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace collapsed, surrounding punctuation / `$` / `*` / quotes and a
    trailing period stripped, and LaTeX text wrappers (\\text{B}, \\mathrm{B}) unwrapped,
    because boxed answers are often written that way: " **Paris**. ", "$\\text{Paris}$" and
    "paris" compare equal."""
    text = _TEXT_WRAPPER.sub(r"\1", text)
    return _WHITESPACE.sub(" ", text.casefold()).strip(_STRIP_CHARS)


def verify_exact(completion: str, answer: str) -> Verdict:
    """The extracted final answer, normalised, equal to the normalised gold answer."""
    gold = normalize_answer(answer)
    if not gold:
        raise ValueError(f"exact verifier: gold answer {answer!r} is empty after normalising")
    extracted = extract_final_answer(completion)
    if extracted is None:
        return Verdict.failed(NO_ANSWER)
    return Verdict(correct=normalize_answer(extracted) == gold, extracted=extracted)


# --------------------------------------------------------------------------------------------
# numeric: the last number, within a tolerance
# --------------------------------------------------------------------------------------------

# A number not glued to a word or another number on either side (so "x2", "8lizzers", "101rom"
# and "v1.2.3" give none, and "5-3" ends in 3, not -3): \frac{a}{b}, a/b, 1,234.5 (thousands
# separators), 1.5e-3, .5, 42.
_NUMBER = re.compile(
    r"""
    (?P<frac>-?\\[dt]?frac\{\s*(?P<fn>-?\d+(?:\.\d+)?)\s*\}\{\s*(?P<fd>\d+(?:\.\d+)?)\s*\})
    |
    (?<![\w.])
    (?P<num>
        [-+\u2212]?
        (?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)
        (?:/\d+(?:\.\d+)?|[eE][-+]?\d+)?
    )
    (?!\w|\.\w)
    """,
    re.VERBOSE,
)
_MAX_EXPONENT = 1000  # beyond this Fraction would build enormous integers; no answer is that big


def parse_number(text: str) -> Fraction | None:
    """A number as written in a completion (one `_NUMBER` match) as an exact Fraction, so that
    0.1 + 0.2-style float error never decides a grade; None if it is not a number (a zero
    denominator, an absurd exponent)."""
    m = _NUMBER.fullmatch(text.strip())
    if m is None:
        return None
    if m.group("frac"):
        sign = -1 if m.group("frac").startswith("-") else 1
        num, den = Fraction(m.group("fn")) * sign, Fraction(m.group("fd"))
        return num / den if den else None
    s = m.group("num").replace(",", "").replace("\u2212", "-")
    if "/" in s:
        top, bottom = s.split("/", 1)
        return Fraction(top) / Fraction(bottom) if Fraction(bottom) else None
    exponent = re.search(r"[eE]([-+]?\d+)$", s)
    if exponent and abs(int(exponent.group(1))) > _MAX_EXPONENT:
        return None
    return Fraction(s)


def extract_last_number(text: str) -> str | None:
    """The last number in the text, as written (see _NUMBER for the forms); None if none."""
    matches = list(_NUMBER.finditer(text))
    return matches[-1].group(0) if matches else None


def _gold_number(answer: str, who: str) -> Fraction:
    """The gold answer as a number; a gold that is not one is a data-set error, so it raises."""
    value = parse_number(answer.strip().strip("$").strip())
    if value is None:
        raise ValueError(f"{who}: gold answer {answer!r} is not a number")
    return value


def _check_tolerances(abs_tol: float, rel_tol: float) -> None:
    if not (abs_tol >= 0 and rel_tol >= 0):
        raise ValueError(f"tolerances must be >= 0, got abs_tol={abs_tol}, rel_tol={rel_tol}")


def _close(pred: Fraction, gold: Fraction, abs_tol: float, rel_tol: float) -> bool:
    """|pred - gold| <= max(abs_tol, rel_tol * |gold|), in exact arithmetic."""
    return abs(pred - gold) <= max(Fraction(abs_tol), Fraction(rel_tol) * abs(gold))


def _numeric_verdict(
    text: str, gold: Fraction, abs_tol: float, rel_tol: float, missing: str
) -> Verdict:
    extracted = extract_last_number(text)
    if extracted is None:
        return Verdict.failed(missing)
    value = parse_number(extracted)
    if value is None:
        return Verdict.failed(f"{UNPARSEABLE}: {extracted!r}")
    return Verdict(correct=_close(value, gold, abs_tol, rel_tol), extracted=extracted)


def verify_numeric(
    completion: str, answer: str, *, abs_tol: float = 1e-6, rel_tol: float = 1e-9
) -> Verdict:
    """The last number in the completion equals the gold number within
    |pred - gold| <= max(abs_tol, rel_tol * |gold|). The *last* number, because reasoning
    traces state their result at the end; no number is an extraction failure. Percent signs
    and units are ignored (50% reads as 50). A non-numeric gold answer raises ValueError."""
    _check_tolerances(abs_tol, rel_tol)
    gold = _gold_number(answer, "numeric verifier")
    return _numeric_verdict(completion, gold, abs_tol, rel_tol, NO_NUMBER)


# --------------------------------------------------------------------------------------------
# regex
# --------------------------------------------------------------------------------------------


class RegexVerifier:
    """The last match of `pattern` is the answer (group 1 when the pattern has groups, else
    the whole match), compared as `then`: "exact" (normalised text) or "numeric" (the last
    number inside the match, within the tolerances). For data sets with a fixed answer format
    ("#### 42", "ANSWER: B"); flags go inline, e.g. "(?i)answer: (\\w+)"."""

    def __init__(
        self,
        pattern: str,
        then: Literal["exact", "numeric"] = "exact",
        *,
        abs_tol: float = 1e-6,
        rel_tol: float = 1e-9,
    ) -> None:
        try:
            self.regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"regex verifier: invalid pattern {pattern!r}: {e}") from e
        if then not in ("exact", "numeric"):
            raise ValueError(f"regex verifier: then must be 'exact' or 'numeric', got {then!r}")
        _check_tolerances(abs_tol, rel_tol)
        self.pattern = pattern
        self.then = then
        self.abs_tol = abs_tol
        self.rel_tol = rel_tol

    def __repr__(self) -> str:
        return f"RegexVerifier({self.pattern!r}, then={self.then!r})"

    def extract(self, completion: str) -> str | None:
        """The last match (its group 1 if the pattern has groups and the group took part)."""
        group = 1 if self.regex.groups else 0
        found = None
        for m in self.regex.finditer(completion):
            if m.group(group) is not None:
                found = m.group(group)
        return found

    def __call__(self, completion: str, answer: str) -> Verdict:
        if self.then == "numeric":
            gold = _gold_number(answer, f"regex verifier {self.pattern!r}")
            extracted = self.extract(completion)
            if extracted is None:
                return Verdict.failed(f"no match for {self.pattern!r}")
            missing = f"no number in the match {extracted!r}"
            return _numeric_verdict(extracted, gold, self.abs_tol, self.rel_tol, missing)
        gold_text = normalize_answer(answer)
        if not gold_text:
            raise ValueError(f"regex verifier: gold answer {answer!r} is empty after normalising")
        extracted = self.extract(completion)
        if extracted is None:
            return Verdict.failed(f"no match for {self.pattern!r}")
        return Verdict(correct=normalize_answer(extracted) == gold_text, extracted=extracted)


# --------------------------------------------------------------------------------------------
# user functions and load_verifier
# --------------------------------------------------------------------------------------------


class _UserVerifier:
    """A user function (completion, answer) -> bool | Verdict, held to the Verdict contract."""

    def __init__(self, spec: str, fn: Callable[[str, str], Any]) -> None:
        self.spec = spec
        self.fn = fn

    def __repr__(self) -> str:
        return f"load_verifier({self.spec!r})"

    def __call__(self, completion: str, answer: str) -> Verdict:
        result = self.fn(completion, answer)
        if isinstance(result, Verdict):
            return result
        if isinstance(result, bool | np.bool_):
            # A bare bool says nothing about extraction: the whole completion stands for it.
            return Verdict(correct=bool(result), extracted=completion.strip())
        raise TypeError(
            f"verifier {self.spec!r} returned {type(result).__name__}; expected bool or Verdict"
        )


def load_verifier(spec: str) -> Verifier:
    """The verifier a data set names: "math", "exact", "numeric", "regex:PATTERN" (compared
    exactly), "regex-numeric:PATTERN", or "module.path:function" (imported; the function
    returns a bool or a Verdict). The regex prefixes are matched first, so a pattern may itself
    contain ":". Unknown names and unimportable functions raise ValueError naming the spec."""
    if spec == "math":
        return verify_math
    if spec == "exact":
        return verify_exact
    if spec == "numeric":
        return verify_numeric
    if spec.startswith("regex-numeric:"):
        return RegexVerifier(spec[len("regex-numeric:") :], "numeric")
    if spec.startswith("regex:"):
        return RegexVerifier(spec[len("regex:") :], "exact")
    if spec in ("regex", "regex-numeric"):
        raise ValueError(f"verifier {spec!r} needs a pattern: {spec}:PATTERN")
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise ValueError(f"unknown verifier {spec!r}: expected {_SPEC_HELP}")
    if not module_name or not attr:
        raise ValueError(f"verifier {spec!r}: expected module.path:function")
    fn = import_named(f"verifier {spec!r}", module_name, attr)
    if not callable(fn):
        raise ValueError(f"verifier {spec!r}: {attr!r} is not callable")
    return _UserVerifier(spec, fn)
