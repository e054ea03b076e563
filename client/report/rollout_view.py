"""The report's "Rollouts" section: saved rollouts token by token (opd.client.train.rollout_store).

The diagnostics are means over a step; this shows what they average. For the first and the last
saved step, up to MAX_ROLLOUTS rollouts spread over the step's rows are printed token by token.
Each token's background is its log-ratio log q(y_t) - log p(y_t) (teacher minus student log-prob
of the sampled token, the per-token reward of the sampled objective) on a diverging scale
clipped at +-CLIP nats: red where the teacher finds the token much less likely than the student
did, blue where it finds it more likely, white near 0. A token's tooltip gives its id, its text,
both log-probs and the ratio.

An episode (a row with spans: opd.client.train.episodes, rollout_store format 2) shows its
structure: a header with its assistant turns, how it ended, its reward and per-turn grades when
the environment gave them; the opening prompt (its token count: the file keeps no prompt text);
then per assistant turn an "assistant · turn j" block, token by token as above over that turn's
trained positions only, followed by the context appended after it (tool results, user turns)
under its role labels, grey and marked "context: not trained". Single completions show as they
always did.

Tokens come from the file's token_pieces (and an episode's context from its context_texts);
without them (written without token_text) each token shows as its id. Every piece is
HTML-escaped, and newlines, carriage returns and other control characters are drawn as visible
marks. pyarrow and numpy are imported only when a page with rollouts is built.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CLIP",
    "CSS",
    "MAX_CONTEXT_CHARS",
    "MAX_ROLLOUTS",
    "MAX_TOKENS",
    "ratio_color",
    "rollouts_section",
]

# Colour saturates at 4 nats: a token the teacher finds e^4 ~ 55 times less (or more) likely than
# the student did. The quickstart's untrained student averages -3.8 per token, so smaller clips
# would paint most of a young run's tokens fully red and hide which ones are worst.
CLIP = 4.0
MAX_ROLLOUTS = 4
# Longer completions are cut on the page (the file holds them whole): ~1000 spans per rollout
# keeps the page light enough to mail.
MAX_TOKENS = 1000
# An episode's context after one turn (a tool's output, a user turn) is cut at this many
# characters on the page (this many ids where no text was saved).
MAX_CONTEXT_CHARS = 2000

_RED = (192, 57, 43)
_BLUE = (31, 111, 178)
_COLUMNS = (
    "prompt_index",
    "prompt_len",
    "truncated",
    "token_ids",
    "token_pieces",
    "student_token_logp",
    "teacher_token_logp",
    # episodes (format 2); absent from older files, null for single completions
    "spans",
    "context_roles",
    "context_texts",
    "ended",
    "reward",
    "turn_correct",
)
# EpisodeInfo.ended, in words
_ENDED = {
    "done": "ended by the environment",
    "max_turns": "stopped at the turn limit",
    "turn_tokens": "stopped: a turn hit the token limit",
    "episode_tokens": "stopped at the episode's token limit",
}

CSS = """
.rollout { background: white; border: 1px solid #d9e2ec; border-radius: 6px; margin: 1em 0;
           padding: .6em 1em; }
.tokens { font: 13px/1.7 "DejaVu Sans Mono", Menlo, Consolas, monospace; white-space: pre-wrap;
          word-break: break-word; }
.tok { border-radius: 2px; }
.tok .mark { color: #7b8794; }
.legend .tok { padding: 0 .5em; font: 12px monospace; }
.turn { border-left: 3px solid #1f6fb2; margin: .5em 0; padding: .1em 0 .1em .7em; }
.context { border-left: 3px dashed #cbd2d9; margin: .5em 0; padding: .1em 0 .1em .7em;
           background: #f5f7fa; color: #7b8794; }
.context .tokens { color: #7b8794; }
.turn-head { font-weight: 600; margin: .2em 0; }
.context .turn-head { font-weight: normal; font-style: italic; }
.role { font-family: monospace; background: #e4e7eb; color: #52606d; border-radius: 3px;
        padding: 0 .35em; font-style: normal; }
"""

_MARKS = {"\n": "\u21b5\n", "\r": "\u240d", "\t": "\u21e5\t"}


def ratio_color(ratio: float) -> str:
    """The background of a token with this log q - log p: transparent at 0 (or nan), fully
    red at -CLIP and below, fully blue at +CLIP and above."""
    if not math.isfinite(ratio):
        return "transparent"
    x = max(-1.0, min(1.0, ratio / CLIP))
    r, g, b = _RED if x < 0 else _BLUE
    return f"rgba({r},{g},{b},{0.85 * abs(x):.2f})"


def rollouts_section(run_dir: Path, steps: Sequence[int], max_rollouts: int = MAX_ROLLOUTS) -> str:
    """The section's HTML for RUN_DIR's saved `steps` (ascending); "" when there are none."""
    from opd.client.train.rollout_store import read_step, step_path

    if not steps:
        return ""
    shown = [steps[0]] if steps[0] == steps[-1] else [steps[0], steps[-1]]
    blocks = []
    episodes = False
    for step in shown:
        cols = read_step(run_dir, step, _COLUMNS)
        n = len(cols["token_ids"])
        which = "first" if step == steps[0] else "last"
        if len(shown) == 1:
            which = "only"
        title = f"Step {step} ({which} saved step): {n} rollouts"
        rows = _spread(n, max_rollouts)
        if len(rows) < n:
            title += f", {len(rows)} shown"
        blocks.append(f"<h3>{html.escape(title)}</h3>")
        for i in rows:
            if cols.get("spans", [None] * n)[i] is not None:
                episodes = True
                blocks.append(_episode(cols, i, n))
            else:
                blocks.append(_rollout(cols, i, n))
    saved = ", ".join(str(s) for s in steps[:20]) + (", ..." if len(steps) > 20 else "")
    where = html.escape(str(step_path(run_dir, steps[-1]).parent))
    intro = (
        "<p>The rollouts a step really trained on, token by token. Background: "
        "log q(y<sub>t</sub>) &minus; log p(y<sub>t</sub>), the teacher's minus the student's "
        "log-prob of the sampled token, in nats, clipped at "
        f"&plusmn;{CLIP:g}: red where the teacher finds the token much less likely than the "
        "student did, blue where it finds it more likely. Hover a token for its numbers. "
        "&#8629; marks a newline.</p>"
    )
    if episodes:
        intro += _EPISODES_NOTE
    return (
        f"{intro}{_legend()}"
        f"<p class='meta'>Saved steps in <code>{where}</code>: {html.escape(saved)}. Load any "
        "of them with <code>opd.client.train.rollout_store.read_rollouts(RUN_DIR, steps=[...])"
        "</code> or <code>pandas.read_parquet</code>.</p>" + "".join(blocks)
    )


_EPISODES_NOTE = (
    "<p>Episodes (multi-turn rollouts) show each assistant turn, the only tokens trained on, "
    "coloured as above, and between turns the context the environment appended (tool results, "
    "user turns) under its role, in grey: context is not trained.</p>"
)


def _spread(n: int, k: int) -> list[int]:
    """Up to k row indices spread evenly over n rows (rollouts of one prompt are adjacent)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


def _legend() -> str:
    cells = "".join(
        f'<span class="tok" style="background:{ratio_color(v)}">{v:+g}</span>'
        if v
        else f'<span class="tok" style="background:{ratio_color(v)}">0</span>'
        for v in (-CLIP, -CLIP / 2, -CLIP / 4, 0.0, CLIP / 4, CLIP / 2, CLIP)
    )
    return f'<p class="legend">log q &minus; log p (nats): {cells}</p>'


def _rollout(cols: dict[str, list[Any]], i: int, n: int) -> str:
    import numpy as np

    ids = cols["token_ids"][i]
    prompt_len = int(cols["prompt_len"][i])
    completion = ids[prompt_len:]
    student = cols["student_token_logp"][i]
    teacher = cols.get("teacher_token_logp", [None] * n)[i]
    pieces = cols.get("token_pieces", [None] * n)[i]
    t = len(completion)
    facts = [
        f"prompt #{cols['prompt_index'][i]}",
        f"{prompt_len} prompt tokens",
        f"{t} completion tokens",
        "truncated" if cols["truncated"][i] else "ended with EOS",
    ]
    if teacher is None:
        ratio = np.full(t, np.nan)
        facts.append("not scored by the teacher")
    else:
        ratio = teacher.astype(np.float64) - student.astype(np.float64)
        if t:
            facts.append(f"mean log q/p {ratio.mean():+.3f}")
            facts.append(f"{int((ratio <= -CLIP).sum())} tokens at or below -{CLIP:g}")
    if pieces is None:
        facts.append("no decoded text saved: token ids shown")
    spans = _tokens(completion, pieces, student, teacher, ratio, range(min(t, MAX_TOKENS)))
    cut = f"<p class='meta'>First {MAX_TOKENS} of {t} tokens shown.</p>" if t > MAX_TOKENS else ""
    head = html.escape(f"rollout {i + 1} of {n}: " + ", ".join(facts))
    return (
        f'<div class="rollout" data-row="{i}"><p class="meta">{head}</p>'
        f'<div class="tokens">{"".join(spans)}</div>{cut}</div>'
    )


def _tokens(
    ids: Any, pieces: list[str] | None, student: Any, teacher: Any, ratio: Any, rows: range
) -> list[str]:
    """One coloured <span> per trained position in `rows` (indices into the per-position
    arrays; ids[j] is the token at row j), its numbers in the tooltip."""
    spans = []
    for j in rows:
        tid = int(ids[j])
        text = _visible(pieces[j]) if pieces is not None else f"[{tid}]"
        tip = [f"token {tid}" + (f" {pieces[j]!r}" if pieces is not None else "")]
        tip.append(f"student log p {float(student[j]):.3f}")
        if teacher is not None:
            tip.append(f"teacher log q {float(teacher[j]):.3f}")
            tip.append(f"log q/p {ratio[j]:+.3f}")
        spans.append(
            f'<span class="tok" style="background:{ratio_color(float(ratio[j]))}" '
            f'title="{html.escape(chr(10).join(tip))}">{text}</span>'
        )
    return spans


def _episode(cols: dict[str, list[Any]], i: int, n: int) -> str:
    """A multi-turn rollout: header, prompt, then per assistant turn its tokens and the context
    appended after it (module docstring)."""
    import numpy as np

    ids = cols["token_ids"][i]
    prompt_len = int(cols["prompt_len"][i])
    spans = np.asarray(cols["spans"][i], dtype=np.int64).reshape(-1, 2)
    lengths = [int(b - a) for a, b in spans]
    t = sum(lengths)
    completion = ids[np.concatenate([np.arange(a, b) for a, b in spans] or [np.zeros(0, int)])]
    student = cols["student_token_logp"][i]
    teacher = cols.get("teacher_token_logp", [None] * n)[i]
    pieces = cols.get("token_pieces", [None] * n)[i]
    roles = roles_all = cols.get("context_roles", [None] * n)[i] or []
    texts = cols.get("context_texts", [None] * n)[i]
    ended = cols.get("ended", [None] * n)[i]
    reward = cols.get("reward", [None] * n)[i]
    correct = cols.get("turn_correct", [None] * n)[i] or []
    # re-anchored episodes (format 3): span j is turn span_turns[j]; the teacher's turns
    # between two spans are shown in the context after the first, labelled "teacher"
    turn_of = cols.get("span_turns", [None] * n)[i] or list(range(len(spans)))
    roles = _span_roles(roles, [int(t) for t in turn_of])
    # the ids after each turn up to the next one (after the last: to the end of token_ids)
    nexts = [int(a) for a, _ in spans[1:]] + [len(ids)]
    context = [(int(b), nxt) for (_, b), nxt in zip(spans, nexts, strict=True)]

    facts = [
        f"prompt #{cols['prompt_index'][i]}",
        f"{len(spans)} assistant turn" + ("" if len(spans) == 1 else "s"),
        f"{prompt_len} prompt tokens",
        f"{t} trained tokens",
        f"{sum(b - a for a, b in context)} context tokens",
    ]
    if ended is not None:
        facts.append(f"{_ENDED.get(ended, 'ended')} ({ended})")
    facts.append("no reward" if reward is None else f"reward {reward:g}")
    if correct:
        facts.append(f"{sum(map(bool, correct))}/{len(correct)} turns correct")
    if teacher is None:
        ratio = np.full(t, np.nan)
        facts.append("not scored by the teacher")
    else:
        ratio = teacher.astype(np.float64) - student.astype(np.float64)
        if t:
            facts.append(f"mean log q/p {ratio.mean():+.3f}")
            facts.append(f"{int((ratio <= -CLIP).sum())} tokens at or below -{CLIP:g}")
    if pieces is None:
        facts.append("no decoded text saved: token ids shown")
    head = html.escape(f"rollout {i + 1} of {n}, an episode: " + ", ".join(facts))

    parts = [
        f'<div class="context" data-prompt="{prompt_len}"><p class="turn-head">'
        f'<span class="role">prompt</span> {prompt_len} tokens (its text is not saved) '
        "&middot; context: not trained</p></div>"
    ]
    start = 0  # row of the turn's first position in the per-position arrays
    budget = MAX_TOKENS
    for j, length in enumerate(lengths):
        turn = [f"{length} tokens"]
        if teacher is not None and length:
            turn.append(f"mean log q/p {ratio[start : start + length].mean():+.3f}")
        if turn_of[j] < len(correct):
            turn.append("correct" if correct[turn_of[j]] else "not correct")
        shown = min(length, budget)
        if shown < length:
            turn.append(f"{shown} shown")
        budget -= shown
        toks = _tokens(completion, pieces, student, teacher, ratio, range(start, start + shown))
        parts.append(
            f'<div class="turn" data-turn="{j}"><p class="turn-head">'
            f"assistant &middot; turn {turn_of[j] + 1} of {len(roles_all)}: "
            f'{html.escape(", ".join(turn))}</p><div class="tokens">{"".join(toks)}</div></div>'
        )
        start += length
        parts.append(_context(j, roles, texts, ids, context[j]))
    cut = (
        f"<p class='meta'>First {MAX_TOKENS} of {t} trained tokens shown.</p>"
        if t > MAX_TOKENS
        else ""
    )
    return (
        f'<div class="rollout episode" data-row="{i}"><p class="meta">{head}</p>'
        f"{''.join(parts)}{cut}</div>"
    )


def _span_roles(roles: list[str], turn_of: list[int]) -> list[str]:
    """Per trained span, the comma-joined roles of everything after it up to the next span:
    the roles after its turn and, for each teacher-written turn in between, "teacher" and the
    roles after that turn."""
    out = []
    for j, turn in enumerate(turn_of):
        nxt = turn_of[j + 1] if j + 1 < len(turn_of) else len(roles)
        labels = [roles[turn] if turn < len(roles) else ""]
        for t in range(turn + 1, nxt):
            labels.append(f"teacher,{roles[t]}" if t < len(roles) else "teacher")
        out.append(",".join(x for x in ",".join(labels).split(",") if x))
    return out


def _context(
    j: int, roles: list[str], texts: list[str] | None, ids: Any, where: tuple[int, int]
) -> str:
    """The context appended after turn j: its role labels, then its text (its ids without
    saved text), grey; "" when nothing follows the turn."""
    a, b = where
    labels = [r for r in (roles[j] if j < len(roles) else "").split(",") if r]
    text = texts[j] if texts is not None and j < len(texts) else None
    if not labels and b <= a and not text:
        return ""
    role = "".join(f'<span class="role">{html.escape(r)}</span> ' for r in labels)
    if not labels:
        role = '<span class="role">context</span> '
    note = f"{b - a} tokens"
    if text is None:
        body = " ".join(f"[{int(x)}]" for x in ids[a : min(b, a + MAX_CONTEXT_CHARS)])
        note += ", no decoded text saved: token ids shown"
        if b - a > MAX_CONTEXT_CHARS:
            note += f", first {MAX_CONTEXT_CHARS} shown"
    else:
        body = "".join(_visible(ch) for ch in text[:MAX_CONTEXT_CHARS])
        if len(text) > MAX_CONTEXT_CHARS:
            note += f", first {MAX_CONTEXT_CHARS} of {len(text)} characters shown"
    return (
        f'<div class="context" data-after-turn="{j}"><p class="turn-head">{role}'
        f"{html.escape(note)} &middot; context: not trained</p>"
        f'<div class="tokens">{body}</div></div>'
    )


def _visible(piece: str) -> str:
    """A token's text as escaped HTML, with newlines and control characters drawn visibly."""
    if piece == "":
        return '<span class="mark">\u2205</span>'
    out = []
    for ch in piece:
        if ch in _MARKS:
            mark = _MARKS[ch]
            out.append(f'<span class="mark">{mark[0]}</span>{mark[1:]}')
        elif ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            out.append(f'<span class="mark">\\x{ord(ch):02x}</span>')
        else:
            out.append(html.escape(ch))
    return "".join(out)
