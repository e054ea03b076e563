"""The replication's tables: one per finding, the paper's claim beside the number measured here,
and a verdict computed from the numbers by the rule printed under each table (never typed in).

Rules compare effects, not significance: at this scale an eval set has a few hundred questions,
so each table also prints the accuracies' 95% intervals for the reader to judge.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from opd.client.replication.plan import SAME_PIPELINE, STUDENT, TEACHER_X, TEACHER_Y

_DIAG = ("overlap/ratio", "overlap/token_advantage", "entropy/gap", "kl/sampled")


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _acc(results: dict, label: str) -> float:
    return float(results["accuracy"][label]["accuracy"])


def _acc_ci(results: dict, label: str) -> str:
    entry = results["accuracy"][label]
    ci = entry.get("ci")
    if ci and len(ci) == 2 and ci[0] is not None:
        return f"{entry['accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return _f(entry["accuracy"])


def _probe_entry(results: dict, name: str, key: str = "probe_before") -> dict[str, Any]:
    return next(t for t in results[key]["teachers"] if t.get("name") == name)


def _window(run: list[dict], key: str, first: bool, share: float = 0.2) -> float:
    """Mean of `key` over the first (or last) share of the run's steps that logged it."""
    values = [m[key] for m in run if isinstance(m.get(key), (int, float))]
    if not values:
        return math.nan
    n = max(1, int(len(values) * share))
    part = values[:n] if first else values[-n:]
    return sum(part) / len(part)


def _gap_recovery(before: float, after: float, teacher: float) -> float:
    return math.nan if teacher == before else (after - before) / (teacher - before)


def _verdict(ok: bool, partly: bool = False) -> str:
    return "reproduces" if ok else ("partly reproduces" if partly else "does not reproduce")


def compatible_vs_incompatible(r: dict) -> tuple[str, bool]:
    before = _acc(r, STUDENT)
    rows, gains, overlaps = [], {}, {}
    for teacher, run in ((TEACHER_X, "opd-from-x"), (TEACHER_Y, "opd-from-y")):
        probe = _probe_entry(r, teacher)["metrics"]
        after, t_acc = _acc(r, run), _acc(r, teacher)
        gains[teacher], overlaps[teacher] = after - before, probe["overlap/ratio"]
        m = r["runs"][run]
        rows.append(
            f"| {teacher} | {_f(t_acc)} | {_f(probe['overlap/ratio'])} | "
            f"{_f(probe['overlap/token_advantage'])} | {_f(probe['entropy/gap'])} | "
            f"{_probe_entry(r, teacher)['verdict']['class']} | "
            f"{_f(_probe_entry(r, teacher).get('outcome', {}).get('auroc'))} | "
            f"{_f(_window(m, 'overlap/ratio', True))} → {_f(_window(m, 'overlap/ratio', False))} | "
            f"{_f(before)} → {_acc_ci(r, run)} | {_f(_gap_recovery(before, after, t_acc))} |"
        )
    ok = overlaps[TEACHER_X] > overlaps[TEACHER_Y] and gains[TEACHER_X] > gains[TEACHER_Y]
    text = "\n".join([
        "## 1. Compatible vs incompatible teacher",
        "",
        "Paper: a teacher whose thinking patterns match the student's (high initial top-k "
        "overlap) works; successful runs climb from about 72% to above 91% overlap and recover "
        "more than 80% of the gap; a teacher with another style fails even when it scores "
        "higher. The sequence reward's AUROC against correctness was 0.73 and 0.75 for the "
        "paper's two teachers.",
        "",
        "| teacher | teacher acc | initial overlap | overlap-token adv. | entropy gap | "
        "probe verdict | reward AUROC | overlap first → last 20% of OPD | "
        "student acc before → after [95% CI] | gap recovery |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Rule: reproduces when teacher-x has the higher initial overlap and the larger accuracy "
        f"gain. Here: **{_verdict(ok)}**.",
    ])  # fmt: skip
    return text, ok


def no_new_knowledge(r: dict) -> tuple[str, bool]:
    before = _acc(r, STUDENT)
    gain_x = _acc(r, "opd-from-x") - before
    rows, small, classes = [], [], {}
    for teacher, run in ((SAME_PIPELINE, "opd-from-same-pipeline"), (STUDENT, "opd-from-self"),
                         (TEACHER_X, "opd-from-x")):  # fmt: skip
        entry = _probe_entry(r, teacher)
        m = entry["metrics"]
        gain = _acc(r, run) - before
        classes[teacher] = entry["verdict"]["class"]
        if teacher != TEACHER_X:
            small.append(gain <= 0.5 * max(gain_x, 0.0))
        rows.append(
            f"| {teacher} | {_f(_acc(r, teacher))} | {_f(m['kl/sampled'], 4)} | "
            f"{_f(m['overlap/ratio'])} | {classes[teacher]} | {_f(before)} → {_acc_ci(r, run)} | "
            f"{gain:+.3f} |"
        )
    ok = all(small) and classes[STUDENT] == "no-signal"
    partly = any(small) or classes[STUDENT] == "no-signal"
    text = "\n".join([
        "## 2. No new knowledge: a same-pipeline teacher, and the student itself",
        "",
        "Paper: the teacher must know something the student does not; same-pipeline teachers "
        "of another size are indistinguishable from the student's side, and the probe should "
        "say \"no signal\". The student as its own teacher is the sanity check: zero loss, "
        "overlap 1.",
        "",
        "| teacher | teacher acc | probe KL (nats/token) | initial overlap | probe verdict | "
        "student acc before → after [95% CI] | gain |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Rule: reproduces when the probe says no-signal for the student itself and both "
        "teachers' accuracy gain is at most half of teacher-x's (the compatible teacher with "
        f"the knowledge, last row). Here: **{_verdict(ok, partly)}**.",
    ])  # fmt: skip
    return text, ok


def reverse_distillation(r: dict) -> tuple[str, bool]:
    before, after, teacher = _acc(r, TEACHER_X), _acc(r, "reverse"), _acc(r, STUDENT)
    moved = math.nan if before == teacher else (before - after) / (before - teacher)
    ok = after < before and teacher < before
    text = "\n".join([
        "## 3. Reverse distillation: a weaker teacher pulls a stronger student down",
        "",
        "Paper: distilling from a weaker teacher moves the student back toward the teacher's "
        "level.",
        "",
        "| student (teacher-x) acc before | after OPD from the weaker student model [95% CI] | "
        "teacher (student model) acc | share of the gap moved toward the teacher |",
        "|---|---|---|---|",
        f"| {_f(before)} | {_acc_ci(r, 'reverse')} | {_f(teacher)} | {_f(moved)} |",
        "",
        f"Rule: reproduces when the accuracy falls. Here: **{_verdict(ok)}**.",
    ])  # fmt: skip
    return text, ok


def rescue(r: dict) -> tuple[str, bool]:
    before = _acc(r, STUDENT)
    alone, sft, both = (
        _acc(r, "opd-from-y"),
        _acc(r, "coldstart-sft"),
        _acc(r, "coldstart+opd-from-y"),
    )
    o_alone = r["runs"]["opd-from-y"]
    o_both = r["runs"]["coldstart+opd-from-y"]
    ok = both > alone
    text = "\n".join([
        "## 4. Rescue: cold start on teacher-y's responses, then OPD from teacher-y",
        "",
        "Paper: an off-policy cold start (SFT on the teacher's responses) before OPD recovers "
        "a pair that fails on its own.",
        "",
        "| path | overlap first → last 20% of OPD | student acc [95% CI] |",
        "|---|---|---|",
        f"| before | | {_f(before)} |",
        f"| OPD from teacher-y alone | {_f(_window(o_alone, 'overlap/ratio', True))} → "
        f"{_f(_window(o_alone, 'overlap/ratio', False))} | {_acc_ci(r, 'opd-from-y')} |",
        f"| cold start (SFT) only | | {_acc_ci(r, 'coldstart-sft')} |",
        f"| cold start, then OPD from teacher-y | {_f(_window(o_both, 'overlap/ratio', True))} → "
        f"{_f(_window(o_both, 'overlap/ratio', False))} | {_acc_ci(r, 'coldstart+opd-from-y')} |",
        "",
        "Rule: reproduces when cold start + OPD ends above OPD alone "
        f"({_f(both)} vs {_f(alone)}; SFT alone {_f(sft)}). Here: **{_verdict(ok)}**.",
    ])  # fmt: skip
    return text, ok


def depth(
    r: dict, bucket_keys: tuple[str, ...] = ("reward/seq_mean", "overlap/ratio")
) -> tuple[str, bool]:
    lines = [
        "## 5. Depth: the teacher's advantage and the dense reward by completion position",
        "",
        "Paper: the teacher's advantage when continuing a student prefix falls with the "
        "prefix's length (+0.37 at 1K tokens to +0.02 at 16K); instability starts at the end "
        "of long responses. Here responses are about 30 tokens, so depth is in tokens.",
        "",
        "Teacher-x continuing the student's prefixes (greedy), before and after OPD from "
        "teacher-x:",
        "",
        "| prefix tokens | advantage before | advantage after |",
        "|---|---|---|",
    ]
    curves = {}
    for key in ("probe_before", "probe_after"):
        rows = r[key].get("depth_probe", {}).get("by_prefix", [])
        curves[key] = {row["prefix_tokens"]: row["teachers"].get(TEACHER_X, {}).get("advantage")
                       for row in rows}  # fmt: skip
    prefixes = sorted(set(curves["probe_before"]) | set(curves["probe_after"]))
    for p in prefixes:
        lines.append(
            f"| {p} | {_f(curves['probe_before'].get(p))} | {_f(curves['probe_after'].get(p))} |"
        )
    run = r["runs"]["opd-from-x"]
    buckets = sorted(
        {k.split("@depth")[1] for m in run for k in m if "@depth" in k},
        key=lambda b: int(b.split("-")[0]),
    )
    lines += ["", "OPD from teacher-x, by completion position (first vs last 20% of steps):", ""]
    header = " | ".join(f"{k} early | {k} late" for k in bucket_keys)
    lines += [f"| tokens | {header} |", "|---|" + "---|" * (2 * len(bucket_keys))]
    for b in buckets:
        cells = " | ".join(
            f"{_f(_window(run, key, True))} | {_f(_window(run, key, False))}"
            for key in (f"{k}@depth{b}" for k in bucket_keys)
        )
        lines.append(f"| {b} | {cells} |")
    before = curves["probe_before"]
    first, last = (before.get(prefixes[0]), before.get(prefixes[-1])) if prefixes else (None, None)
    ok = first is not None and last is not None and last < first
    lines += [
        "",
        "Rule: reproduces when, before OPD, the teacher's advantage at the deepest prefix is "
        f"below its advantage at the shallowest. Here: **{_verdict(ok)}**.",
    ]
    return "\n".join(lines), ok


FINDINGS = (compatible_vs_incompatible, no_new_knowledge, reverse_distillation, rescue, depth)


def write_tables(results: dict[str, Any], path: Path) -> dict[str, bool]:
    """replication.md: the five tables, the models, the run time; returns each verdict."""
    sections, verdicts = [], {}
    for finding in FINDINGS:
        text, ok = finding(results)
        sections.append(text)
        verdicts[finding.__name__] = ok
    models = ["| model | role | style | accuracy [95% CI] |", "|---|---|---|---|"]
    for spec in results["plan"]["models"]:
        name = spec["name"]
        models.append(f"| {name} | {spec['role']} | {spec['style']} | {_acc_ci(results, name)} |")
    timing = results["timing"]
    head = [
        "# Replication" + (" (tiny mode: the numbers mean nothing)" if results["tiny"] else ""),
        "",
        f"Seed {results['seed']}; total {timing['total_s']:.0f} s "
        f"(models {timing['models_s']:.0f} s).",
        "",
        *models,
        "",
    ]
    path.write_text("\n".join(head + [s + "\n" for s in sections]))
    return verdicts
