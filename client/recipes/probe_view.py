"""Terminal view of a probe report (rich tables): ranking with verdicts, then metrics by depth."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from opd.client.recipes.probe import SUMMARY_KEYS, depth_rows, turn_rows

_LABELS = {
    "overlap/ratio": "overlap",
    "overlap/token_advantage": "advantage",
    "entropy/gap": "H gap",
    "overlap/mass_student": "mass p",
    "overlap/mass_teacher": "mass q",
    "kl/sampled": "KL",
    "entropy/student": "H(p)",
    "entropy/teacher": "H(q)",
}
_STYLE = {"good": "green", "borderline": "yellow", "no-signal": "magenta", "incompatible": "red"}


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_probe(report: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"probe: {report['prompts']} prompts x {report['rollouts_per_prompt']} rollout(s), "
        f"{report['positions']} positions"
    )
    table.add_column("rank")
    table.add_column("teacher")
    for key in SUMMARY_KEYS:
        table.add_column(_LABELS[key], justify="right")
    table.add_column("horizon")
    table.add_column("verdict")
    for t in report["teachers"]:
        if "error" in t:
            table.add_row(str(t["rank"]), t["name"], *["-"] * (len(SUMMARY_KEYS) + 1), t["error"])
            continue
        v = t["verdict"]
        table.add_row(
            str(t["rank"]),
            t["name"] + (" (x-tok)" if t.get("cross_tokenizer") else ""),
            *(_fmt(t["metrics"].get(k)) for k in SUMMARY_KEYS),
            t["horizon"]["display"] if "horizon" in t else "-",
            f"[{_STYLE[v['class']]}]{v['label']}[/]",
        )
    console.print(table)
    for t in report["teachers"]:
        if "error" in t:
            continue
        console.print(f"[bold]{t['rank']}. {t['name']}[/]: " + "; ".join(t["verdict"]["reasons"]))
        if t.get("cross_tokenizer"):
            print_cross(t["metrics"], console)
        if "horizon" in t:
            print_horizon(t["horizon"], console)
        depth = Table(title=f"{t['name']} by depth (completion tokens)")
        depth.add_column("depth")
        keys = ("overlap/ratio", "overlap/token_advantage", "entropy/gap", "kl/sampled")
        for key in keys:
            depth.add_column(_LABELS[key], justify="right")
        columns = {key: dict(depth_rows(t["metrics"], key)) for key in keys}
        for label in columns["overlap/ratio"]:
            depth.add_row(label, *(_fmt(columns[k].get(label)) for k in keys))
        console.print(depth)
        turns = turn_rows(t["metrics"])
        if turns:  # episodes (--env): the teacher's signal turn by turn
            by_turn = Table(title=f"{t['name']} by assistant turn")
            by_turn.add_column("turn")
            by_turn.add_column("tokens", justify="right")
            for key in keys:
                by_turn.add_column(_LABELS[key], justify="right")
            for j, values in turns:
                by_turn.add_row(
                    str(j),
                    f"{values.get('tokens/count', 0):.0f}",
                    *(_fmt(values.get(k)) for k in keys),
                )
            console.print(by_turn)
    if "domains" in report:
        _print_domains(report, console)
    print_outcome(report, console)


def print_cross(m: dict[str, Any], console: Console) -> None:
    """How a teacher of another tokenizer met the student's text (x-tok in the table)."""
    console.print(
        f"  another tokenizer: {_fmt(m.get('xtok/one_to_one_frac'))} of the student's tokens "
        f"in chunks of one token on both sides (overlap, entropy and top-k KL are read there), "
        f"{_fmt(m.get('xtok/candidates_mapped_frac'))} of its candidates map; KL per chunk "
        f"{_fmt(m.get('kl/sampled_per_chunk'))}"
    )


def print_horizon(h: dict[str, Any], console: Console) -> None:
    """A teacher's recommended horizon, why, the overlap by bucket it read, and how to train
    with it: the adaptive rule's one-batch answer is only useful with the flags that act on it."""
    console.print(f"  horizon: {h['display']}: {h['reason']}")
    if h["overlap_by_bucket"]:
        console.print(
            f"  overlap by {h['bucket']}-token bucket: "
            + ", ".join(f"{k} {v:.3f}" for k, v in h["overlap_by_bucket"].items())
        )
    if h["recommended"] is not None:
        console.print(
            f"  train with: opd train --horizon {h['recommended']} (or --horizon adaptive "
            f"--horizon-bucket {h['bucket']} --horizon-fade {h['fade']:g} "
            f"--horizon-min-tokens {h['min_tokens']})"
        )


def print_outcome(report: dict[str, Any], console: Console) -> None:
    """With --answer-field: the student's accuracy, each teacher's reward AUROC; with --depth:
    the teacher-continuation curve."""
    student = report.get("student_outcome")
    if student:
        lo, hi = student["mean_at_n_interval"]
        console.print(
            f"student accuracy on its rollouts: {_fmt(student['mean_at_n'])} "
            f"[{_fmt(lo)}, {_fmt(hi)}] over {student['prompts']} prompts"
        )
        for t in report["teachers"]:
            o = t.get("outcome")
            if o:
                console.print(
                    f"  {t['name']}: reward AUROC {_fmt(o['auroc'])}"
                    + (
                        " [{}, {}]".format(*map(_fmt, o["auroc_interval"]))
                        if "auroc_interval" in o
                        else ""
                    )
                    + f" (r right "
                    f"{_fmt(o['reward_mean_correct'])}, r wrong {_fmt(o['reward_mean_wrong'])}, "
                    f"{o['correct']}/{o['rollouts']} right)"
                    + (f": undefined, {o['undefined']}" if o.get("undefined") else "")
                )
    depth = report.get("depth_probe")
    if depth and "by_turn" in depth:
        table = Table(
            title=f"depth probe across turns: {depth['samples']} continuations per start and "
            "model (score: the environment's reward, or correctness)"
        )
        for col in ("from turn", "episodes", "student", "teacher", "teacher score", "advantage"):
            table.add_column(col, justify="right")
        for row in depth["by_turn"]:
            for name, t in row["teachers"].items():
                lo, hi = t["advantage_ci"]
                table.add_row(
                    str(row["turn"]),
                    str(row["rollouts"]),
                    _fmt(row["student"]["score"]),
                    name,
                    _fmt(t["score"]),
                    f"{_fmt(t['advantage'])} [{_fmt(lo)}, {_fmt(hi)}]",
                )
        console.print(table)
    elif depth:
        table = Table(title=f"depth probe: {depth['samples']} continuations per prefix and model")
        for col in (
            "prefix tokens",
            "rollouts",
            "student acc",
            "teacher",
            "teacher acc",
            "advantage",
        ):
            table.add_column(col, justify="right")
        for row in depth["by_prefix"]:
            for name, t in row["teachers"].items():
                lo, hi = t["advantage_ci"]
                table.add_row(
                    str(row["prefix_tokens"]),
                    str(row["rollouts"]),
                    _fmt(row["student"]["accuracy"]),
                    name,
                    _fmt(t["accuracy"]),
                    f"{_fmt(t['advantage'])} [{_fmt(lo)}, {_fmt(hi)}]",
                )
        console.print(table)


def _print_domains(report: dict[str, Any], console: Console) -> None:
    """Per domain, the ranking (teacher, overlap, KL, verdict), then the suggested routing."""
    table = Table(title=f"by domain ({report['suggested_routing']['field']})")
    for col in ("domain", "rollouts", "rank", "teacher", "overlap", "KL", "verdict"):
        table.add_column(col, justify="right" if col in ("rollouts", "overlap", "KL") else "left")
    for domain, entry in report["domains"].items():
        for i, t in enumerate(entry["ranking"]):
            v, m = t["verdict"], t["metrics"]
            table.add_row(
                domain if i == 0 else "",
                str(entry["rollouts"]) if i == 0 else "",
                str(t["rank"]),
                t["name"],
                _fmt(m.get("overlap/ratio")),
                _fmt(m.get("kl/sampled")),
                f"[{_STYLE[v['class']]}]{v['class']}[/]",
            )
    console.print(table)
    routing = report["suggested_routing"]
    console.print("suggested routing for opd train: " + " ".join(routing["flags"]))
    for domain, why in routing["unfit"].items():
        console.print(f"[red]domain {domain}:[/] {why}")
