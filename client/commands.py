"""The student side's `opd` commands: each a function that builds its typer command on demand.

The CLI (opd.client.cli) imports this module only when one of these commands is run or asked
for its help, and each builder imports only its config (opd.client.configs, no torch); the
command's work (trainer, probe, ...) is imported inside its run function, when it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from opd.client.run_log import console_and_file_logging
from opd.shared.config_cli import config_command

KEY_NOTE = "The teacher API key comes from OPD_API_KEY."


def _command(config: str, run: Callable[[Any], None], text: str) -> Any:
    """The typer command of a config ("module:Class", imported now) and its run function."""
    module, name = config.split(":")
    model = getattr(importlib.import_module(module), name)
    return config_command(model, run, doc=f"{text} {KEY_NOTE}")


def _console(out_dir: str, log_name: str) -> tuple[Any, Callable[[str], None]]:
    """The terminal for a recipe's own lines (and a dim progress logger), everything else
    logged to OUT_DIR/LOG_NAME (opd.client.run_log)."""
    from rich.console import Console

    console_and_file_logging(Path(out_dir) / log_name)
    console = Console()
    return console, lambda msg: console.print(f"[dim]{msg}[/dim]")


def train_command() -> Any:
    return _command(
        "opd.client.configs.train:TrainConfig",
        run_train,
        "On-policy distillation: the student samples, the teacher service scores, the "
        "student learns.",
    )


def run_train(config: Any) -> None:
    from opd.client.train.progress import progress_bar, step_line
    from opd.client.train.trainer import Trainer

    console, _ = _console(config.run_dir, "train.log")
    with Trainer(config) as trainer:
        console.print(
            f"{'resumed from ' + str(trainer.resume_from) if trainer.resume_from else 'fresh run'}"
            f" at step {trainer.step}; teacher {trainer.teacher_info.name}; "
            f"run dir {config.run_dir} (log: train.log)"
        )
        for line in trainer.notices:
            console.print(line)
        with progress_bar(console) as progress:
            task = progress.add_task("opd", total=config.max_steps, completed=trainer.step, info="")

            def on_step(step: int, metrics: dict[str, float]) -> None:
                progress.update(task, completed=step, info=step_line(metrics))

            trainer.run(on_step=on_step)
    console.print(
        f"done: metrics in {config.run_dir}/metrics.jsonl, "
        f"checkpoints in {config.run_dir}/checkpoints"
    )


def probe_command() -> Any:
    return _command(
        "opd.client.configs.probe:ProbeConfig",
        run_probe_command,
        "Pre-flight probe: student rollouts scored by each teacher (--teacher, repeat to "
        "compare); overlap, advantage, entropy gap, KL (overall and by depth), a verdict per "
        "teacher, and a ranking.",
    )


def run_probe_command(config: Any) -> None:
    from opd.client.recipes.probe import run_probe
    from opd.client.recipes.probe_view import print_probe

    console, log = _console(config.out_dir, "probe.log")
    report = run_probe(config, log=log)
    print_probe(report, console)
    console.print(f"written: {config.out_dir}/probe.json (plots: opd report {config.out_dir})")


def coldstart_command() -> Any:
    return _command(
        "opd.client.configs.coldstart:ColdstartConfig",
        run_coldstart_command,
        "Off-policy cold start: teacher responses, filtered, SFT the student on them "
        "(--sft-*), then OPD (--opd-*) on prompts not used for SFT (split recorded).",
    )


def run_coldstart_command(config: Any) -> None:
    from opd.client.recipes.coldstart import run_coldstart

    console, log = _console(config.out_dir, "coldstart.log")
    summary = run_coldstart(config, log=log)
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


def select_prompts_command() -> Any:
    return _command(
        "opd.client.configs.select:SelectConfig",
        run_select_prompts,
        "Rank a prompt pool by alignment with the teacher, dedupe it against other sets, "
        "mix in out-of-distribution prompts, and write the selected set with its scores.",
    )


def run_select_prompts(config: Any) -> None:
    from opd.client.recipes.select_prompts import run_select_prompts as run

    run(config)


def eval_command() -> Any:
    return _command(
        "opd.client.configs.evaluate:EvalConfig",
        run_eval_command,
        "Accuracy on questions with answers: mean@n and pass@k with 95% intervals for "
        "students (folders, checkpoints, run dirs) and teachers (POST /v1/generate), and the "
        "gap recovery rate.",
    )


def run_eval_command(config: Any) -> None:
    from opd.client.recipes.evaluate import print_eval, run_eval

    console, log = _console(config.out_dir, "eval.log")
    report = run_eval(config, log=log)
    print_eval(report, console)
    console.print(f"written: {config.out_dir}/eval.json and one per-prompt file per source")


def report_command() -> Any:
    from opd.client.report.build import report_command as command

    return command


def quickstart_command() -> Any:
    def quickstart() -> None:
        """The main job: OPD end to end on the embedded SmolLM2 (teacher) and a 24-layer
        student."""
        from opd.client.recipes.quickstart import run_quickstart

        run_quickstart()

    return quickstart


def score_demo_command() -> Any:
    def score_demo(
        prompt: Annotated[str, typer.Option(help="user message of the scored example")] = (
            "What is the capital of France?"
        ),
    ) -> None:
        """Start the embedded teacher in its own process and score an example conversation."""
        from opd.client.recipes.score_demo import run_score_demo

        run_score_demo(prompt)

    return score_demo
