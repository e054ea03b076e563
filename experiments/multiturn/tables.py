"""OUT/multiturn.md: the teacher's signal by turn index, before vs after OPD, computed from the
measurements in results.json (never typed in), and the verdicts by the rules stated up front.

Rules (printed in the document before the tables, applied here):
* OPD helps at turn j when the after-student's per-turn accuracy 95% interval lies entirely
  above the before-student's, hurts when it lies entirely below, and is "no clear change"
  otherwise. Overall, OPD helps when it helps at one turn or more and hurts at none; hurts when
  it hurts somewhere and helps nowhere; "mixed" when both; else "no clear change".
* The teacher's signal reaches turn j when the teacher-continuation advantage's 95% interval
  from turn j lies entirely above 0 ("none" when it contains 0, "negative" below).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

HELPS, HURTS, MIXED, NO_CHANGE = "helps", "hurts", "mixed", "no clear change"
_DIAG = (
    ("overlap/ratio", "overlap"),
    ("overlap/token_advantage", "overlap-token adv."),
    ("kl/sampled", "sampled KL"),
    ("entropy/student", "student entropy"),
    ("tokens/count", "tokens"),
)

RULES = """\
Verdict rules (fixed before the run, applied by experiments/multiturn/tables.py):
- **OPD helps at turn j** when the after-student's per-turn accuracy 95% Wilson interval lies
  entirely above the before-student's; **hurts** when entirely below; otherwise **no clear
  change**. Overall: **helps** when it helps at one turn or more and hurts at none, **hurts**
  when the reverse, **mixed** when both, else **no clear change**. The same interval rule is
  applied to the episode success (Wilson) and to the reward (bootstrap over episodes).
- **The teacher's signal reaches turn j** when the teacher-continuation advantage's 95%
  bootstrap interval from turn j lies entirely above 0 (**none** when it contains 0,
  **negative** when below)."""


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and digits == 0):
        return f"{int(value)}"
    return f"{value:.{digits}f}"


def _ci(ci: Any) -> str:
    if not ci or ci[0] is None or not all(isinstance(x, float | int) for x in ci):
        return "n/a"
    if any(isinstance(x, float) and not math.isfinite(x) for x in ci):
        return "n/a"
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def turn_verdict(before: dict, after: dict) -> str:
    """Per turn: helps / hurts / no clear change, by the accuracies' 95% intervals."""
    (b_lo, b_hi), (a_lo, a_hi) = before["ci"], after["ci"]
    if a_lo > b_hi:
        return HELPS
    if a_hi < b_lo:
        return HURTS
    return NO_CHANGE


def overall_verdict(per_turn: list[str]) -> str:
    helps, hurts = HELPS in per_turn, HURTS in per_turn
    if helps and hurts:
        return MIXED
    return HELPS if helps else HURTS if hurts else NO_CHANGE


def signal_verdict(ci: Any) -> str:
    lo, hi = ci
    if not (isinstance(lo, float | int) and math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    return "reaches" if lo > 0 else "negative" if hi < 0 else "none"


def _teacher_metrics(probe: dict) -> dict[str, float]:
    return probe["teachers"][0]["metrics"]


def _turn_metrics(metrics: dict[str, float], key: str, j: int) -> Any:
    return metrics.get(f"{key}@turn{j}")


def diagnostics_table(r: dict) -> list[str]:
    """Overlap, overlap-token advantage, sampled KL, entropy and tokens by turn, before → after
    (the probe: the student's sampled episodes on the held-out rows, scored by the teacher)."""
    before, after = _teacher_metrics(r["probe_before"]), _teacher_metrics(r["probe_after"])
    turns = r["plan"]["turns"]
    head = "| turn | " + " | ".join(f"{label} (before → after)" for _, label in _DIAG) + " |"
    lines = [head, "|" + "---|" * (len(_DIAG) + 1)]
    for j in range(turns):
        cells = []
        for key, _ in _DIAG:
            digits = 0 if key == "tokens/count" else 3
            b, a = _turn_metrics(before, key, j), _turn_metrics(after, key, j)
            cells.append(f"{_f(b, digits)} → {_f(a, digits)}")
        lines.append(f"| {j} | " + " | ".join(cells) + " |")
    cells = []
    for key, _ in _DIAG:
        digits = 0 if key == "tokens/count" else 3
        cells.append(f"{_f(before.get(key), digits)} → {_f(after.get(key), digits)}")
    lines.append("| all | " + " | ".join(cells) + " |")
    return lines


def _window(run: list[dict], key: str, first: bool, share: float = 0.2) -> float:
    """Mean of `key` over the first (or last) `share` of the run's steps (nan if not logged)."""
    steps = [int(m["step"]) for m in run if isinstance(m.get("step"), int | float)]
    if not steps:
        return math.nan
    lo, hi = min(steps), max(steps)
    width = max(1, round((hi - lo + 1) * share))
    values = [
        m[key]
        for m in run
        if isinstance(m.get(key), int | float)
        and isinstance(m.get("step"), int | float)
        and (m["step"] < lo + width if first else m["step"] > hi - width)
    ]
    return sum(values) / len(values) if values else math.nan


def training_table(r: dict) -> list[str]:
    """The same diagnostics as the trainer logged them, first vs last 20% of the steps."""
    run, turns = r["run"], r["plan"]["turns"]
    keys = [(k, label) for k, label in _DIAG if k != "tokens/count"]
    head = "| turn | " + " | ".join(f"{label} (first → last)" for _, label in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1)]
    for j in range(turns):
        cells = [
            f"{_f(_window(run, f'{k}@turn{j}', True))} → {_f(_window(run, f'{k}@turn{j}', False))}"
            for k, _ in keys
        ]
        lines.append(f"| {j} | " + " | ".join(cells) + " |")
    return lines


def continuation_table(r: dict) -> tuple[list[str], dict[str, list[str]]]:
    """The teacher-continuation advantage from each turn, before and after, with its interval."""
    turns = r["plan"]["turns"]
    rows: dict[int, dict[str, Any]] = {}
    signal: dict[str, list[str]] = {}
    for when in ("before", "after"):
        signal[when] = []
        for row in r[f"probe_{when}"]["depth_probe"]["by_turn"]:
            rows.setdefault(row["turn"], {})[when] = row
    lines = [
        "| from turn | starts (before / after) | student score | teacher score | "
        "advantage [95% CI] | per remaining turn | signal |",
        "|---|---|---|---|---|---|---|",
    ]
    for j in sorted(rows):
        cells: dict[str, list[str]] = {k: [] for k in ("n", "s", "t", "a", "rem", "sig")}
        for when in ("before", "after"):
            row = rows[j].get(when)
            if row is None:
                for k in cells:
                    cells[k].append("n/a")
                continue
            t = row["teachers"]["teacher"]
            verdict = signal_verdict(t["advantage_ci"])
            signal[when].append(f"turn {j}: {verdict}")
            cells["n"].append(str(row["rollouts"]))
            cells["s"].append(_f(row["student"]["score"]))
            cells["t"].append(_f(t["score"]))
            cells["a"].append(f"{_f(t['advantage'])} {_ci(t['advantage_ci'])}")
            cells["rem"].append(_f(t["advantage"] * turns / (turns - j)))
            cells["sig"].append(verdict)
        lines.append(
            f"| {j} | {' / '.join(cells['n'])} | {' → '.join(cells['s'])} | "
            f"{' → '.join(cells['t'])} | {' → '.join(cells['a'])} | {' → '.join(cells['rem'])} "
            f"| {' → '.join(cells['sig'])} |"
        )
    return lines, signal


def accuracy_table(r: dict) -> tuple[list[str], list[str], str]:
    """Per-turn accuracy of teacher, student before, student after; the verdict per turn."""
    acc = r["accuracy"]
    lines = [
        "| turn | teacher | student before | student after | OPD at this turn |",
        "|---|---|---|---|---|",
    ]
    verdicts = []
    for j in range(r["plan"]["turns"]):
        t, b, a = (acc[k]["by_turn"][j] for k in ("teacher", "before", "after"))
        verdict = turn_verdict(b, a)
        verdicts.append(verdict)
        lines.append(
            f"| {j} | {_f(t['accuracy'])} {_ci(t['ci'])} | {_f(b['accuracy'])} {_ci(b['ci'])} | "
            f"{_f(a['accuracy'])} {_ci(a['ci'])} | {verdict} |"
        )
    e = {k: acc[k]["episode_success"] for k in ("teacher", "before", "after")}
    lines.append(
        f"| episode (all turns right) | {_f(e['teacher']['accuracy'])} {_ci(e['teacher']['ci'])} "
        f"| {_f(e['before']['accuracy'])} {_ci(e['before']['ci'])} | "
        f"{_f(e['after']['accuracy'])} {_ci(e['after']['ci'])} | "
        f"{turn_verdict(e['before'], e['after'])} |"
    )
    rw = {k: {"accuracy": acc[k]["reward_mean"], "ci": acc[k]["reward_ci"]} for k in acc}
    reward_verdict = turn_verdict(rw["before"], rw["after"])
    lines.append(
        "| reward (share of turns right) | "
        + " | ".join(
            f"{_f(rw[k]['accuracy'])} {_ci(rw[k]['ci'])}" for k in ("teacher", "before", "after")
        )
        + f" | {reward_verdict} |"
    )
    return lines, verdicts, overall_verdict(verdicts), reward_verdict


def write_tables(r: dict, path: Path) -> dict[str, Any]:
    """Write OUT/multiturn.md; returns the verdicts (saved in results.json)."""
    plan = r["plan"]
    card = r["teacher_card"]
    eval_n = r["accuracy"]["teacher"]["episode_success"]["episodes"]
    acc_lines, per_turn, overall, reward_verdict = accuracy_table(r)
    cont_lines, signal = continuation_table(r)
    title = "# Multi-turn episodes: the teacher's signal by turn"
    if r["tiny"]:
        title += " (tiny mode: toy budgets, the numbers mean nothing)"
    doc = [
        title,
        "",
        f"Environment: `followup`, {plan['turns']} turns, at most {plan['max_new_tokens']} "
        f"tokens per turn. Teacher: SmolLM2-135M-Instruct fine-tuned with opd's SFT on "
        f"{card['examples']} scripted, correct episodes ({plan['sft_steps']} steps of "
        f"{plan['sft_batch']}, lr {plan['sft_lr']}, environment seed {plan['sft_env_seed']}). "
        f"Student: {plan['keep']} of the fine-tuned teacher's 30 layers. OPD: "
        f"{plan['opd_steps']} steps x {plan['prompts_per_step']} rows x {plan['n_rollouts']} "
        f"episodes, sampled objective, lr {plan['lr']}, rollout engine {r['engine']}. "
        f"Evaluation rows are held out from the SFT and OPD rows.",
        "",
        RULES,
        "",
        "## Per-turn accuracy (opd eval --env, greedy)",
        "",
        f"{eval_n} held-out episodes per model; a turn never reached counts as wrong; 95% "
        "Wilson intervals.",
        "",
        *acc_lines,
        "",
        f"Here: OPD **{overall}** (per turn: {', '.join(per_turn)}; on the reward: "
        f"{reward_verdict}).",
        "",
        "## Diagnostics by assistant turn (opd probe --env), before → after OPD",
        "",
        f"The student's sampled episodes ({plan['probe_prompts']} held-out rows x "
        f"{plan['probe_rollouts']}) scored by the teacher; k = {plan['top_k']}.",
        "",
        *diagnostics_table(r),
        "",
        "## Teacher-continuation advantage by turn (opd probe --depth --depth-prefix J)",
        "",
        "From the student's own first j turns, the student and the teacher each play the rest "
        "(greedy); the score is the episode's reward (share of all turns right), the advantage "
        "the teacher's score minus the student's on the same starts (paired, bootstrap 95% "
        "interval). 'Per remaining turn' rescales it to the turns still to play.",
        "",
        *cont_lines,
        "",
        "## The same diagnostics during training (opd train metrics, first → last 20% of steps)",
        "",
        *training_table(r),
        "",
        f"Teacher SFT: {_f(card['seconds'], 0)} s"
        + (
            " (reused from OUT/models, trained with the same recipe by an earlier run)"
            if r["timing"]["models_s"] < card["seconds"]
            else ""
        )
        + f". Wall time of this run: {_f(r['timing']['total_s'], 0)} s "
        + "("
        + ", ".join(f"{k[:-2]} {_f(v, 0)} s" for k, v in r["timing"].items() if k != "total_s")
        + ").",
        "",
    ]
    path.write_text("\n".join(doc))
    return {"per_turn": per_turn, "overall": overall, "reward": reward_verdict, "signal": signal}
