"""The benchmark commands `opd bench`, `opd bench-train`, `opd bench-load`, `opd bench-spans` and
`opd bench-xtok`, built on demand from their configs (the `opd` CLI loads this module only to run
or describe one of them)."""

from __future__ import annotations

from typing import Any

from opd.shared.config_cli import config_command


def bench_command() -> Any:
    from opd.bench.runner import BenchConfig

    return config_command(
        BenchConfig,
        run_bench_command,
        doc="Benchmark scoring: in-process, HTTP binary/JSON, naive HF, vLLM prompt_logprobs, "
        "limit.",
    )


def bench_train_command() -> Any:
    from opd.bench.train_runner import BenchTrainConfig

    return config_command(
        BenchTrainConfig,
        run_bench_train_command,
        doc="Benchmark the student side: rollout engines, OPD steps, student-math memory.",
    )


def bench_load_command() -> Any:
    from opd.bench.load import BenchLoadConfig

    return config_command(
        BenchLoadConfig,
        run_bench_load_command,
        doc="Benchmark the service under overload: capacity, then open-loop phases at factor "
        "x capacity; throughput, latency of 200s and 429s, 429 share, peak RSS, lost requests. "
        "The API key comes from OPD_API_KEY.",
    )


def bench_spans_command() -> Any:
    from opd.bench.spans import BenchSpansConfig

    return config_command(
        BenchSpansConfig,
        run_bench_spans_command,
        doc="Benchmark scored spans: multi-turn episodes scored on their assistant turns only "
        "vs from the first assistant token on; scored positions, bytes, wall time, ratios.",
    )


def bench_xtok_command() -> Any:
    from opd.bench.cross_tokenizer import BenchXtokConfig

    return config_command(
        BenchXtokConfig,
        run_bench_xtok_command,
        doc="Benchmark cross-tokenizer scoring: the same rollouts on the same teacher, natively "
        "and through the cross-tokenizer path (and on a teacher of another tokenizer); "
        "alignment time, score time, request bytes, ratios.",
    )


def run_bench_command(cfg: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from opd.bench.runner import run_bench

    console = Console()
    report = run_bench(cfg, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    inproc = report["contenders"].get("in-process", {}).get("tokens_per_s")
    table = Table(title=f"opd bench: {report['model']}")
    for col in ("contender", "tokens/s", "x in-proc", "p50 ms", "p99 ms", "B/token", "peak GB"):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for name, v in report["contenders"].items():
        table.add_row(
            name,
            f"{v['tokens_per_s']:.0f}",
            f"{v['tokens_per_s'] / inproc:.2f}" if inproc else "-",
            f"{v['p50_ms']:.0f}",
            f"{v['p99_ms']:.0f}",
            f"{v['bytes_per_token']:.0f}" if v["bytes_per_token"] else "-",
            f"{v['peak_rss_bytes'] / 1e9:.2f}" if v["peak_rss_bytes"] else "-",
        )
    if report["limit"]:
        lim = report["limit"]
        table.add_row("matmul-bound limit", f"{lim['tokens_per_s']:.0f}", "", "", "", "", "")
    console.print(table)
    for t in report["targets"]:
        mark = "[green]met[/green]" if t["met"] else "[red]NOT met[/red]"
        console.print(f"{t['target']}: {t['value']:.3f} (bound {t['bound']}) {mark}")
    if report["long_sequence"]:
        ls = report["long_sequence"]
        console.print(
            f"long sequence {ls['tokens']} tokens: chunked {ls['chunked_peak_bytes'] / 1e6:.0f} MB"
            f" vs full logits {ls['full_peak_bytes'] / 1e6:.0f} MB"
        )
    console.print(f"results: {report['path']}")


def run_bench_train_command(cfg: Any) -> None:
    from rich.console import Console

    from opd.bench.train_runner import markdown_table, run_bench_train

    console = Console()
    report = run_bench_train(cfg, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    console.print(markdown_table(report), markup=False)
    console.print(f"results: {report['path']}")


def run_bench_load_command(cfg: Any) -> None:
    from rich.console import Console

    from opd.bench.load import run_bench_load
    from opd.bench.load_report import COLUMNS, table_rows

    console = Console()
    report = run_bench_load(cfg, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    # one column per phase: thirteen measures side by side do not fit a terminal
    console.print(_transposed(f"opd bench-load: {report['model']}", COLUMNS, table_rows(report)))
    for warning in report["warnings"]:
        console.print(f"[yellow]note:[/yellow] {warning}")
    lost = sum(p["lost"] for p in report["phases"])
    if lost:
        console.print(f"[red]{lost} requests lost[/red] (see lost_by_kind in the JSON)")
    console.print(f"results: {report['path']}")


def run_bench_spans_command(cfg: Any) -> None:
    from rich.console import Console

    from opd.bench.spans import COLUMNS, run_bench_spans, table_rows

    console = Console()
    report = run_bench_spans(cfg, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    # one column per case: fourteen measures side by side do not fit a terminal
    console.print(_transposed(f"opd bench-spans: {report['model']}", COLUMNS, table_rows(report)))
    console.print(f"results: {report['path']}")


def run_bench_xtok_command(cfg: Any) -> None:
    from rich.console import Console

    from opd.bench.cross_tokenizer import COLUMNS, run_bench_xtok, table_rows

    console = Console()
    report = run_bench_xtok(cfg, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    console.print(_transposed(f"opd bench-xtok: {report['student']}", COLUMNS, table_rows(report)))
    console.print(f"results: {report['path']}")


def _transposed(title: str, columns: Any, rows: list[list[str]]) -> Any:
    """A rich table with one column per row of `rows` (a phase, a case) and one line per
    measure: `columns[0]` heads the measures' column, `columns[1:]` name the measures."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column(columns[0])
    for row in rows:
        table.add_column(row[0], justify="right")
    for i, name in enumerate(columns[1:], 1):
        table.add_row(name, *(row[i] for row in rows))
    return table
