"""The `opd` command line.

    opd serve [--model PATH_OR_ID] [--dtype ...] [--device ...] [--port 8000]
    opd train --student PATH --teacher-url http://HOST:8000 --prompts FILE [options]
    opd quickstart          # OPD end to end on the embedded SmolLM2, no flags
    opd score-demo          # the teacher service scoring an example
    opd bench               # scoring throughput/latency/memory/payload vs naive HF and vLLM
    opd bench-train         # student side: rollout engines, OPD steps, student-math memory
    opd bench-load          # the service at 2x and 10x its capacity: 429s, latency, lost
    opd probe --student PATH --teacher a=URL [--teacher b=URL2 ...]      # will OPD work?
    opd coldstart --student PATH --teacher-url URL --prompts FILE        # teacher SFT first
    opd select-prompts --pool FILE --teacher-url URL --out FILE          # teacher-aligned set
    opd eval --data FILE --student PATH [--teacher URL]                  # accuracy, pass@n
    opd report RUN_DIR      # PNG plots + one HTML page of a run's / probe's diagnostics
    opd replicate [--tiny]  # the method's findings reproduced on this machine (tables)

The options of serve, train, probe, coldstart, select-prompts and eval are generated from their
typed configs (opd.client.config_cli): each is declared once, on its config field. `--teacher-url`
always means replicas of one teacher; separate teachers are `--teacher [NAME=]URL[,URL...]`.
The configs import their own modules (train: torch), so the `opd` command needs the [train] or
[server] extra; the HTTP client (`opd.client`) needs neither.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from opd.bench.load import BenchLoadConfig
from opd.bench.runner import BenchConfig
from opd.bench.train_runner import BenchTrainConfig
from opd.client.config_cli import config_command
from opd.client.recipes.coldstart import ColdstartConfig
from opd.client.recipes.evaluate import EvalConfig
from opd.client.recipes.probe import ProbeConfig
from opd.client.recipes.select_prompts import select_prompts_command
from opd.client.replication.run import ReplicateConfig
from opd.client.report.build import report_command
from opd.client.train.config import TrainConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="opd: on-policy distillation with a teacher scoring service.",
)
# Secrets come from the environment, never from flags (a command line is visible in `ps`).
API_KEY_ENV = {"api_key": "OPD_API_KEY"}


def serve_settings_command() -> Any:
    from opd.server.settings import Settings

    def run(settings: Settings) -> None:
        from opd.server.serve import run_server

        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        run_server(settings)

    return config_command(
        Settings,
        run,
        doc="Serve a teacher model over HTTP. Every OPD_* variable applies; flags override "
        "them. The API key comes from OPD_API_KEY.",
        exclude=("api_key",),
        nested={"limits": ""},
        env_prefix="OPD_",
    )


def run_train(config: TrainConfig) -> None:
    from rich.console import Console

    from opd.client.recipes.quickstart import progress_bar
    from opd.client.train.trainer import Trainer, summary

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    console = Console()
    with Trainer(config) as trainer:
        console.print(
            f"{'resumed from ' + str(trainer.resume_from) if trainer.resume_from else 'fresh run'}"
            f" at step {trainer.step}; teacher {trainer.teacher_info.name}; "
            f"run dir {config.run_dir}"
        )
        with progress_bar(console) as progress:
            task = progress.add_task("opd", total=config.max_steps, completed=trainer.step, info="")

            def on_step(step: int, metrics: dict[str, float]) -> None:
                progress.update(task, completed=step, info=summary(metrics))

            trainer.run(on_step=on_step)
    console.print(
        f"done: metrics in {config.run_dir}/metrics.jsonl, "
        f"checkpoints in {config.run_dir}/checkpoints"
    )


def run_probe_command(config: ProbeConfig) -> None:
    from rich.console import Console

    from opd.client.recipes.probe import run_probe
    from opd.client.recipes.probe_view import print_probe

    console = Console()
    logging.basicConfig(level=logging.WARNING)
    report = run_probe(config, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    print_probe(report, console)
    console.print(f"written: {config.out_dir}/probe.json (plots: opd report {config.out_dir})")


def run_coldstart_command(config: ColdstartConfig) -> None:
    from rich.console import Console

    from opd.client.recipes.coldstart import run_coldstart

    console = Console()
    logging.basicConfig(level=logging.WARNING)
    summary = run_coldstart(config, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    sft_info = summary["sft"]
    console.print(
        f"kept {summary['counts']['kept']}/{summary['counts']['responses']} teacher responses; "
        f"response NLL {sft_info['response_nll_before']:.3f} -> "
        f"{sft_info['response_nll_after']:.3f} after SFT; student: {summary['student_out']}"
    )
    if config.opd_steps:
        console.print(f"OPD: {config.opd_steps} steps in {summary['opd']['run_dir']}")
    else:
        console.print(f"next: {summary['opd']['command']}")
    console.print(f"written: {config.out_dir}/coldstart.json (plots: opd report {config.out_dir})")


app.command("serve")(serve_settings_command())
app.command("train")(
    config_command(
        TrainConfig,
        run_train,
        doc="On-policy distillation: the student samples, the teacher service scores, the "
        "student learns. The teacher API key comes from OPD_API_KEY.",
        env=API_KEY_ENV,
    )
)
app.command("probe")(
    config_command(
        ProbeConfig,
        run_probe_command,
        doc="Pre-flight probe: student rollouts scored by each teacher (--teacher, repeat to "
        "compare); overlap, advantage, entropy gap, KL (overall and by depth), a verdict per "
        "teacher, and a ranking. The API key comes from OPD_API_KEY.",
        env=API_KEY_ENV,
    )
)
app.command("coldstart")(
    config_command(
        ColdstartConfig,
        run_coldstart_command,
        doc="Off-policy cold start: teacher responses, filtered, SFT the student on them "
        "(--sft-*), then OPD (--opd-*) on prompts not used for SFT (split recorded). The "
        "teacher API key comes from OPD_API_KEY.",
        exclude=("sft.seed",),
        nested={"filters": "", "sft": "sft_", "opd": "opd_"},
        env=API_KEY_ENV,
    )
)
app.command("select-prompts")(select_prompts_command)


def run_eval_command(config: EvalConfig) -> None:
    from rich.console import Console

    from opd.client.recipes.evaluate import print_eval, run_eval

    console = Console()
    logging.basicConfig(level=logging.WARNING)
    report = run_eval(config, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    print_eval(report, console)
    console.print(f"written: {config.out_dir}/eval.json and one per-prompt file per source")


app.command("eval")(
    config_command(
        EvalConfig,
        run_eval_command,
        doc="Accuracy on questions with answers: mean@n and pass@k with 95% intervals for "
        "students (folders, checkpoints, run dirs) and teachers (POST /v1/generate), and the "
        "gap recovery rate. The API key comes from OPD_API_KEY.",
        env=API_KEY_ENV,
    )
)
app.command("report")(report_command)


def run_replicate_command(config: ReplicateConfig) -> None:
    from rich.console import Console

    from opd.client.replication.run import run_replicate

    console = Console()
    logging.basicConfig(level=logging.WARNING)
    run_replicate(config, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    typer.echo((Path(config.out_dir) / "replication.md").read_text())


app.command("replicate")(
    config_command(
        ReplicateConfig,
        run_replicate_command,
        doc="The method's findings reproduced on this machine: trains a student and three "
        "teachers on 3-digit addition, runs probe / train / coldstart / eval on them and writes "
        "one table per finding to OUT/replication.md (docs/replication.md).",
    )
)


@app.command()
def quickstart() -> None:
    """The main job: OPD end to end on the embedded SmolLM2 (teacher) and a 24-layer student."""
    from opd.client.recipes.quickstart import run_quickstart

    logging.basicConfig(level=logging.WARNING)
    run_quickstart()


@app.command("score-demo")
def score_demo(
    prompt: Annotated[str, typer.Option(help="user message of the scored example")] = (
        "What is the capital of France?"
    ),
) -> None:
    """Start the embedded teacher in its own process and score an example conversation."""
    from opd.client.recipes.score_demo import run_score_demo

    run_score_demo(prompt)


def run_bench_command(cfg: BenchConfig) -> None:
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


app.command("bench")(
    config_command(
        BenchConfig,
        run_bench_command,
        doc="Benchmark scoring: in-process, HTTP binary/JSON, naive HF, vLLM prompt_logprobs, "
        "limit.",
        nested={"workload": ""},
    )
)


def run_bench_train_command(cfg: BenchTrainConfig) -> None:
    from rich.console import Console

    from opd.bench.train_runner import markdown_table, run_bench_train

    console = Console()
    report = run_bench_train(cfg, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    console.print(markdown_table(report), markup=False)
    console.print(f"results: {report['path']}")


app.command("bench-train")(
    config_command(
        BenchTrainConfig,
        run_bench_train_command,
        doc="Benchmark the student side: rollout engines, OPD steps, student-math memory.",
    )
)


def run_bench_load_command(cfg: BenchLoadConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    from opd.bench.load import run_bench_load
    from opd.bench.load_report import COLUMNS, table_rows

    console = Console()
    report = run_bench_load(cfg, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    # one column per phase: thirteen measures side by side do not fit a terminal
    rows = table_rows(report)
    table = Table(title=f"opd bench-load: {report['model']}")
    table.add_column(COLUMNS[0])
    for row in rows:
        table.add_column(row[0], justify="right")
    for i, name in enumerate(COLUMNS[1:], 1):
        table.add_row(name, *(row[i] for row in rows))
    console.print(table)
    for warning in report["warnings"]:
        console.print(f"[yellow]note:[/yellow] {warning}")
    lost = sum(p["lost"] for p in report["phases"])
    if lost:
        console.print(f"[red]{lost} requests lost[/red] (see lost_by_kind in the JSON)")
    console.print(f"results: {report['path']}")


app.command("bench-load")(
    config_command(
        BenchLoadConfig,
        run_bench_load_command,
        doc="Benchmark the service under overload: capacity, then open-loop phases at factor "
        "x capacity; throughput, latency of 200s and 429s, 429 share, peak RSS, lost requests. "
        "The API key comes from OPD_API_KEY.",
        env=API_KEY_ENV,
    )
)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
