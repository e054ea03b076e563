"""The tables of `opd bench-load`: one row per phase, for the terminal and the markdown file.

One list of columns and one row builder serve both, so the printed table and the written one
cannot disagree.
"""

from __future__ import annotations

from typing import Any

COLUMNS = (
    "phase",
    "offered req/s",
    "achieved req/s",
    "scored tokens/s",
    "p50 ms",
    "p99 ms",
    "429 share",
    "429 p50 / p99 ms",
    "Retry-After s",
    "statuses",
    "not sent",
    "lost",
    "peak RSS GB",
)


def _f(value: float | None, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per phase (capacity first), in COLUMNS order: the CLI's table and the markdown."""
    rows = []
    cap = report["capacity"]
    named = [] if cap.get("given") else [(f"capacity (closed, c{cap['clients']})", cap)]
    named += [(f"{p['factor']:g}x", p) for p in report["phases"]]
    for name, p in named:
        statuses = " ".join(f"{k}:{v}" for k, v in p["statuses"].items())
        rows.append(
            [
                name,
                _f(p.get("offered_rps"), ".2f"),
                _f(p["achieved_rps"], ".2f"),
                _f(p["scored_tokens_per_s"]),
                _f(p["p50_ms"]),
                _f(p["p99_ms"]),
                f"{p['share_429']:.1%}",
                f"{_f(p['p50_429_ms'])} / {_f(p['p99_429_ms'])}",
                _f(p["retry_after_median_s"], "g"),
                statuses,
                str(p.get("not_sent", "-")),
                str(p["lost"]),
                _f(p["peak_rss_bytes"] / 1e9 if p["peak_rss_bytes"] else None, ".2f"),
            ]
        )
    return rows


def markdown_table(report: dict[str, Any]) -> str:
    cfg, mix, cap = report["config"], report["mix"], report["capacity"]
    lines = [
        f"Model {report['model']} ({report['backend']}); capacity "
        f"{cap['capacity_rps']:.3g} req/s of the mix ({cap['capacity_scored_tokens_per_s']:.0f} "
        f"scored tokens/s{', given' if cap.get('given') else ''}); load phases of "
        f"{cfg['seconds']:g} s, at most {cfg['clients'] or 'unbounded'} in flight; mix: "
        f"{mix['mean_sequences']:.1f} sequences and {mix['mean_scored_per_request']:.0f} scored "
        f"positions per request on average, {mix['msgpack_share']:.0%} msgpack.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * (len(COLUMNS) - 1),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    if report["warnings"]:
        lines += ["", *(f"- note: {w}" for w in report["warnings"])]
    return "\n".join(lines) + "\n"
