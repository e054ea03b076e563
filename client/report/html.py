"""The page of `opd report`: one self-contained HTML file.

Images are embedded as base64 data URIs, CSS is inline and the only script is inline: the page
loads nothing from anywhere, so it can be mailed, attached to a ticket or opened offline. That
script sets `data-images-ok` (images decoded, naturalWidth > 0) and `data-images-total` on
<body> after load, so a headless browser can check that every plot displays.

Sections, each present only when its input is: health, training over steps, by depth, by turn
(episodes: `key@turn{j}` metrics), teacher probe, cold start, quickstart before/after, saved
rollouts (rollout_view.py, with its CSS), run config. Every dynamic string goes through
html.escape; the pieces the sections share (numbers, tables, embedded figures) are in
html_parts.py.
"""

from __future__ import annotations

import html
import json
import math
import time
from typing import Any

from opd.client.configs.train import TrainConfig
from opd.client.report.figures import Plot
from opd.client.report.health import Check, windows
from opd.client.report.html_parts import embed_figures, fmt, table
from opd.client.report.inputs import INPUT_FILES, TURN, RunInputs, Series, num
from opd.client.report.labels import MAIN_METRICS
from opd.client.report.outcome_view import outcome_section, probe_outcome_html
from opd.client.report.plots import TURN_KEYS, teachers_by_rank, verdict_color
from opd.client.report.rollout_view import CSS as _ROLLOUT_CSS
from opd.client.report.rollout_view import rollouts_section
from opd.client.report.teacher_view import teacher_names, teachers_section
from opd.shared.config_cli import flag_values

_CSS = """
body { font: 15px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1f2933; background: #fafbfc; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5em 2em 4em; }
h1 { margin: 0 0 .2em; } h2 { margin-top: 2.2em; border-bottom: 2px solid #d9e2ec; }
h3 { margin: .2em 0; font-size: 1.02em; }
nav a { margin-right: 1.2em; } a { color: #1f6fb2; }
.meta { color: #52606d; } code { background: #eef2f7; padding: 0 .25em; border-radius: 3px; }
table { border-collapse: collapse; margin: .8em 0; background: white; font-size: .92em; }
th, td { border: 1px solid #d9e2ec; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f0f4f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { background: white; border: 1px solid #d9e2ec; border-radius: 6px; margin: 1.2em 0;
         padding: .8em 1em; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #3e4c59; font-size: .92em; margin-top: .4em; }
.badge { display: inline-block; padding: 0 .55em; border-radius: 9px; color: white;
         font-weight: 600; font-size: .85em; white-space: nowrap; }
.badge.verdict { white-space: normal; }
.ok { background: #27ae60; } .warning { background: #e67e22; } .na { background: #9aa5b1; }
.good { color: #1e8449; } .bad { color: #b03a2e; }
.summary { font-size: 1.1em; margin: .6em 0; }
ul.reasons { margin: 0; padding-left: 1.1em; }
details pre { background: white; border: 1px solid #d9e2ec; padding: .8em; overflow-x: auto; }
"""

# Sets data-images-ok / data-images-total on <body> once every image has loaded (or failed).
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesOk = String(ok);
  document.body.dataset.imagesTotal = String(imgs.length);
});
"""

_STATUS_CLASS = {"ok": "ok", "warning": "warning", "n/a": "na"}


def render_page(inputs: RunInputs, checks: list[Check], plots: list[Plot], frac: float) -> str:
    sections: list[tuple[str, str, str]] = []  # (id, title, body)
    if inputs.metrics is not None:
        sections.append(("health", "Health", _health(checks, frac)))
        sections.append(("steps", "Training over steps", _steps(inputs, plots, frac)))
        depth = embed_figures(plots, "depth") or (
            "<p>Every logged position falls in one depth bucket (or the run logged none), so "
            "there is no breakdown by depth. Lower <code>--depth-bucket</code> to get one.</p>"
        )
        sections.append(("depth", "By depth", depth))
        if _turns(inputs.metrics):
            sections.append(("turn", "By turn", _by_turn(inputs.metrics, plots, frac)))
        if teacher_names(inputs.metrics):
            body = teachers_section(inputs.metrics, frac, embed_figures(plots, "teachers"))
            sections.append(("teachers", "Teachers", body))
    if inputs.evals is not None or inputs.eval_summary is not None:
        sections.append(("outcome", "Outcome: accuracy", outcome_section(inputs, plots)))
    if inputs.probe is not None:
        sections.append(("probe", "Teacher probe", _probe(inputs.probe, plots)))
    if inputs.coldstart is not None or inputs.sft is not None:
        sections.append(("coldstart", "Cold start", _coldstart(inputs, plots)))
    if inputs.quickstart is not None:
        title = "Quickstart: before / after"
        sections.append(("quickstart", title, _quickstart(inputs.quickstart)))
    rollouts = rollouts_section(inputs.run_dir, inputs.rollout_steps)
    if rollouts:
        sections.append(("rollouts", "Rollouts", rollouts))
    if inputs.config is not None:
        sections.append(("config", "Run config", _config(inputs.config)))

    name = html.escape(str(inputs.run_dir))
    found = set(inputs.found)
    inputs_list = ", ".join(
        f"<code>{f}</code> {'found' if f in found else 'absent'}" for f in INPUT_FILES
    )
    if rollouts:
        inputs_list += f", <code>rollouts/</code> {len(inputs.rollout_steps)} saved steps"
    css = _CSS + _ROLLOUT_CSS if rollouts else _CSS
    nav = "".join(f'<a href="#{sid}">{html.escape(title)}</a>' for sid, title, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{html.escape(title)}</h2>{content}</section>'
        for sid, title, content in sections
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>opd report: {name}</title><style>{css}</style></head>\n"
        f'<body data-images-ok="0" data-images-total="{len(plots)}"><main>'
        f"<h1>opd report</h1><p class='meta'>Run folder <code>{name}</code>, generated "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}.<br>Inputs: {inputs_list}.</p>"
        f"{_config_line(inputs.config)}<nav>{nav}</nav>{body}</main>"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _badge(status: str, text: str | None = None) -> str:
    cls = _STATUS_CLASS.get(status, "na")
    return f'<span class="badge {cls}">{html.escape(text or status)}</span>'


def _moved_well(direction: str, first: float, last: float) -> str:
    """A check or cross for a change in the direction that means 'closer to the teacher'."""
    if not direction or not (math.isfinite(first) and math.isfinite(last)) or first == last:
        return ""
    good = {
        "down": last < first,
        "up": last > first,
        "toward 0": abs(last) < abs(first),
    }[direction]
    return '<span class="good">&#10003;</span>' if good else '<span class="bad">&#10007;</span>'


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _health(checks: list[Check], frac: float) -> str:
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warning", "n/a")}
    summary = " ".join(_badge(s, f"{n} {s}") for s, n in counts.items() if n)
    rows = [
        (_badge(c.status), html.escape(c.name), html.escape(c.message), html.escape(c.numbers))
        for c in checks
    ]
    return (
        f'<p class="summary">{summary}</p>'
        "<p>Each check compares the mean of a metric over the first and the last "
        f"{frac:.0%} of the logged steps against the paper's failure signature: overlap flat, "
        "overlap-token advantage stuck negative, entropy gap not closing, gradient norm small "
        "from the start; plus entropy blow-up or collapse, rising truncation and degrading deep "
        "positions. One warning on a short or noisy run is a reason to look at the plots below, "
        "not a verdict; several together are the signature of an incompatible pair or a "
        "teacher with nothing to teach. Thresholds: <code>client/report/health.py</code>."
        "</p>" + table(("status", "check", "finding", "numbers and rule"), rows, set())
    )


def _steps(inputs: RunInputs, plots: list[Plot], frac: float) -> str:
    series = inputs.metrics
    assert series is not None
    keys = [*MAIN_METRICS, ("train/grad_norm", "gradient norm (pre-clip)", "")]
    keys.append(("rollout/truncated_frac", "truncated rollouts", "down"))
    keys.append(("episode/truncated_frac", "truncated episodes (--env)", "down"))
    keys.append(("episode/reward_mean", "environment reward per episode (--env)", "up"))
    rows = []
    for key, label, direction in keys:
        w = windows(series, key, frac)
        if w is None:
            continue
        rows.append(
            (
                f"{html.escape(label)}<br><code>{html.escape(key)}</code>",
                fmt(w.first),
                fmt(w.last),
                f"{w.change:+.4g}",
                html.escape(direction),
                _moved_well(direction, w.first, w.last),
            )
        )
    steps = series.steps_S
    intro = (
        f"<p>{len(series)} logged steps ({steps[0]} to {steps[-1]}). Early and late: the mean "
        f"over the first and the last {frac:.0%} of them; &#10003; marks a move toward the "
        "teacher.</p>"
    )
    headers = ("metric", "early", "late", "change", "better when", "")
    steps_table = table(headers, rows, {1, 2, 3}) if rows else ""
    return intro + steps_table + embed_figures(plots, "steps")


# Short column names of the main diagnostics, for tables with several of them.
_SHORT = {
    "overlap/ratio": "overlap",
    "overlap/token_advantage": "overlap adv.",
    "entropy/gap": "entropy gap",
    "kl/sampled": "reverse KL",
    "overlap/mass_teacher": "mass q",
}


def _turns(series: Series) -> list[tuple[int, ...]]:
    """The assistant turns (as TURN labels) with any per-turn diagnostic logged."""
    return sorted(
        {j for key in (*TURN_KEYS, "tokens/count") for j in TURN.labels(series.columns, key)}
    )


def _by_turn(series: Series, plots: list[Plot], frac: float) -> str:
    """Episodes (--env): per assistant turn, its positions per step and the early and late
    means of TURN_KEYS (as in "Training over steps"), then the by-turn figures."""
    import numpy as np

    turns = _turns(series)
    directions = {key: direction for key, _, direction in MAIN_METRICS}
    rows = []
    for label in turns:
        counts = series.get(TURN.column("tokens/count", label))
        cells = []
        for key in TURN_KEYS:
            w = windows(series, TURN.column(key, label), frac)
            cells.append(
                "-"
                if w is None
                else f"{fmt(w.first)} &rarr; {fmt(w.last)} "
                + _moved_well(directions.get(key, ""), w.first, w.last)
            )
        rows.append(
            (
                TURN.tick(label),
                "-" if counts is None else fmt(float(np.nanmean(counts))),
                "-" if counts is None else str(int(np.isfinite(counts).sum())),
                *cells,
            )
        )
    headers = ("turn", "positions/step", "steps", *(_SHORT[k] for k in TURN_KEYS))
    figures = embed_figures(plots, "turn") or (
        "<p>Every logged episode has one assistant turn, so there is no breakdown by turn to "
        "plot.</p>"
    )
    return (
        "<p>Episodes (<code>--env</code>): the diagnostics on the positions of each assistant "
        "turn (0: the first reply; tool results and user turns between them are not scored). "
        "Positions/step: the mean number of scored positions in that turn per step; steps: "
        f"how many steps had an episode that long. Each metric: early &rarr; late, the means "
        f"over the first and the last {frac:.0%} of the steps; &#10003; marks a move toward "
        "the teacher.</p>" + table(headers, rows, set(range(1, len(headers)))) + figures
    )


def _probe(probe: dict[str, Any], plots: list[Plot]) -> str:
    teachers = teachers_by_rank(probe)
    shown = tuple(_SHORT.items())
    rows = []
    for t in teachers:
        v = t.get("verdict") or {}
        m = t.get("metrics") or {}
        reasons = "".join(f"<li>{html.escape(str(r))}</li>" for r in v.get("reasons", []))
        color = verdict_color(v)
        label = html.escape(str(v.get("label", "-")))
        if "error" in t:  # the probe could not reach this teacher
            reasons = f"<li>{html.escape(str(t['error']))}</li>"
            label = "not probed"
        rows.append(
            (
                fmt(t.get("rank")),
                f"<b>{html.escape(str(t.get('name', '?')))}</b><br>"
                f"<small>{html.escape(str(t.get('url', '')))}</small>",
                f'<span class="badge verdict" style="background:{color}">{label}</span>',
                _yes_no(v.get("compatible")),
                _yes_no(v.get("signal")),
                *(fmt(m.get(key)) for key, _ in shown),
                f'<ul class="reasons">{reasons}</ul>',
            )
        )
    headers = ("rank", "teacher", "verdict", "compatible", "signal", *(h for _, h in shown))
    numeric = set(range(5, 5 + len(shown)))
    facts = ", ".join(
        f"{k.replace('_', ' ')} <b>{fmt(probe.get(k))}</b>"
        for k in ("prompts", "rollouts_per_prompt", "positions")
        if k in probe
    )
    return (
        f"<p>Student <code>{html.escape(str(probe.get('student', '?')))}</code>; {facts}. "
        "Every teacher scored the same student rollouts. The paper's two conditions: compatible "
        "thinking patterns (high initial overlap, overlap-token advantage near 0) and a real "
        "signal (the teacher knows something the student does not: clear KL, negative "
        "reward).</p>"
        + table((*headers, "reasons"), rows, numeric)
        + probe_outcome_html(probe)
        + embed_figures(plots, "probe")
        + _details("probe config", probe.get("config"))
        + _details("verdict thresholds", probe.get("thresholds"))
    )


def _yes_no(v: Any) -> str:
    if v is None:
        return "-"
    return '<span class="good">yes</span>' if v else '<span class="bad">no</span>'


def _coldstart(inputs: RunInputs, plots: list[Plot]) -> str:
    cs = inputs.coldstart or {}
    rows = [
        (html.escape(k.replace("_", " ")), f"<code>{html.escape(str(cs[k]))}</code>")
        for k in ("teacher", "student_in", "student_out", "dataset")
        if k in cs
    ]
    counts = cs.get("counts") or {}
    if counts.get("responses"):
        kept = counts.get("kept", 0) / counts["responses"]
        rows.append(("kept", f"{fmt(counts.get('kept'))} of {fmt(counts['responses'])} "
                             f"responses ({kept:.0%})"))  # fmt: skip
    for k, v in (cs.get("sft") or {}).items():
        rows.append((f"sft {html.escape(k.replace('_', ' '))}", fmt(v)))
    intro = (
        "<p>The recovery for an incompatible pair: the teacher writes responses, the filtered "
        "ones fine-tune the student (SFT), and OPD then runs on prompts not used for SFT.</p>"
    )
    facts_table = table(("", ""), rows, set()) if rows else ""
    return (
        intro + facts_table + embed_figures(plots, "coldstart") + _details("split", cs.get("split"))
    )


def _quickstart(qs: dict[str, Any]) -> str:
    before, after = qs.get("before") or {}, qs.get("after") or {}
    rows = []
    for key, label, direction in MAIN_METRICS:
        if key not in before and key not in after:
            continue
        b, a = num(before.get(key)), num(after.get(key))
        change = f"{a - b:+.4g}" if math.isfinite(a - b) else "-"
        rows.append(
            (
                f"{html.escape(label)}<br><code>{html.escape(key)}</code>",
                fmt(b),
                fmt(a),
                change,
                html.escape(direction),
                _moved_well(direction, b, a),
            )
        )
    return (
        "<p>The same diagnostics of the student on the same held-out prompts before and after "
        "OPD; &#10003; marks a move toward the teacher. A healthy run moves most of them.</p>"
        + table(("metric", "before", "after", "change", "better when", ""), rows, {1, 2, 3})
    )


_CONFIG_SHOWN = (
    "objective",
    "topk_variant",
    "lr",
    "max_steps",
    "prompts_per_step",
    "n_rollouts",
    "max_new_tokens",
    "depth_bucket",
)


def _config_line(config: dict[str, Any] | None) -> str:
    if not config:
        return ""
    config = flag_values(TrainConfig, config)
    parts = [f"{k.replace('_', ' ')} <b>{fmt(config[k])}</b>" for k in _CONFIG_SHOWN if k in config]
    student = html.escape(str(config.get("student", "?")))
    return f"<p class='meta'>Student <code>{student}</code>; {', '.join(parts)}.</p>"


def _config(config: dict[str, Any]) -> str:
    return _details("config.json", config)


def _details(title: str, data: Any) -> str:
    """A collapsed block with `data` as JSON; nothing when there is no data."""
    if not data:
        return ""
    text = html.escape(json.dumps(data, indent=1, default=str))
    return f"<details><summary>{html.escape(title)}</summary><pre>{text}</pre></details>"
