"""The `opd` command line: a registry of commands, each loaded only when it is used.

    opd serve [--model PATH_OR_ID] [--dtype ...] [--device ...] [--port 8000]
    opd train --student PATH --teacher-url http://HOST:8000 --prompts FILE [options]
    opd train ... --env followup|calculator|module:Class   # multi-turn / tool-use episodes
    opd quickstart          # OPD end to end on the embedded SmolLM2, no flags
    opd score-demo          # the teacher service scoring an example
    opd probe --student PATH --teacher a=URL [--teacher b=URL2 ...]      # will OPD work?
    opd coldstart --student PATH --teacher-url URL --prompts FILE        # teacher SFT first
    opd select-prompts --pool FILE --teacher-url URL --out FILE          # teacher-aligned set
    opd eval --data FILE --student PATH [--teacher URL]                  # accuracy, pass@n
    opd report RUN_DIR      # PNG plots + one HTML page of a run's / probe's diagnostics
    opd bench               # scoring throughput/latency/memory/payload vs naive HF and vLLM
    opd bench-train         # student side: rollout engines, OPD steps, student-math memory
    opd bench-load          # the service at 2x and 10x its capacity: 429s, latency, lost
    opd bench-spans         # what multi-turn scoring costs: scored spans vs one scored tail
    opd bench-xtok          # what cross-tokenizer scoring costs: aligned vs native path

Why lazy: `opd --help` lists the commands from this table alone, and `opd train --help` imports
only TrainConfig (opd.client.configs), so neither loads torch, transformers or vLLM, which take
seconds. A command's module is imported when the command is chosen; its heavy work is imported
when it runs. The options of every command are generated from its typed config
(opd.shared.config_cli) and each takes `--config FILE`. `--teacher-url` always means replicas of
one teacher; separate teachers are `--teacher [NAME=]URL[,URL...]`.

`opd serve` is the teacher service's own command (opd.server.cli): the table names it by its
module path, so this student-side module never imports the server package.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import typer
from typer import _click as click
from typer.core import TyperCommand, TyperGroup


@dataclass(frozen=True)
class Entry:
    """A command: where its builder lives ("module:function"), its one-line help, its panel."""

    target: str
    help: str
    panel: str


TEACHER, STUDENT, RECIPES, BENCH = "Teacher service", "Training", "Recipes", "Benchmarks"

COMMANDS: dict[str, Entry] = {
    "serve": Entry(
        "opd.server.cli:serve_command", "Serve a teacher model over HTTP (OPD_* settings).", TEACHER
    ),
    "score-demo": Entry(
        "opd.client.commands:score_demo_command",
        "Start the embedded teacher and score an example conversation.",
        TEACHER,
    ),
    "train": Entry(
        "opd.client.commands:train_command",
        "On-policy distillation: the student samples, the teacher scores, the student learns.",
        STUDENT,
    ),
    "quickstart": Entry(
        "opd.client.commands:quickstart_command",
        "The main job: OPD end to end on the embedded SmolLM2 and a 24-layer student.",
        STUDENT,
    ),
    "eval": Entry(
        "opd.client.commands:eval_command",
        "Accuracy on questions with answers: students, teachers, gap recovery.",
        STUDENT,
    ),
    "report": Entry(
        "opd.client.commands:report_command",
        "Plots and one HTML page with health checks for a run or probe folder.",
        STUDENT,
    ),
    "probe": Entry(
        "opd.client.commands:probe_command",
        "Will OPD work? Student rollouts scored by each teacher, a verdict, a ranking.",
        RECIPES,
    ),
    "coldstart": Entry(
        "opd.client.commands:coldstart_command",
        "Off-policy cold start: teacher responses, filtered, SFT, then OPD.",
        RECIPES,
    ),
    "select-prompts": Entry(
        "opd.client.commands:select_prompts_command",
        "Rank a prompt pool by alignment with the teacher; dedupe; mix in OOD prompts.",
        RECIPES,
    ),
    "bench": Entry(
        "opd.bench.commands:bench_command",
        "Scoring throughput, latency, memory and payload vs naive HF, vLLM, the limit.",
        BENCH,
    ),
    "bench-train": Entry(
        "opd.bench.commands:bench_train_command",
        "The student side: rollout engines, OPD steps, student-math memory.",
        BENCH,
    ),
    "bench-load": Entry(
        "opd.bench.commands:bench_load_command",
        "The service under overload: capacity, 429s, latency, lost requests.",
        BENCH,
    ),
    "bench-spans": Entry(
        "opd.bench.commands:bench_spans_command",
        "Multi-turn scoring: assistant-turn spans vs one tail; positions, bytes, time.",
        BENCH,
    ),
    "bench-xtok": Entry(
        "opd.bench.commands:bench_xtok_command",
        "Cross-tokenizer scoring: aligned vs native path; alignment time, bytes, ratios.",
        BENCH,
    ),
}


class PanelCommand(TyperCommand):
    """A command whose --help lists its options in one section per option group (the config's
    groups: Student, Teacher, Sampling, ...), in click's plain layout: a long option name pushes
    its help to the next line instead of being cut, at any terminal width (rich's tables cut
    names to fit their columns)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[bool, tuple[str, str]]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            panel = getattr(param, "rich_help_panel", None) or "Options"
            sections.setdefault(panel, []).append((not param.required, record))
        for panel, records in sections.items():
            with formatter.section(panel):  # the section's required options first
                formatter.write_dl([r for _, r in sorted(records, key=lambda x: x[0])])


def load_command(name: str) -> click.Command:
    """Import the command's module and build its click command (typer does the building)."""
    entry = COMMANDS[name]
    module, function = entry.target.split(":")
    built = getattr(importlib.import_module(module), function)()
    single = typer.Typer(add_completion=False, rich_markup_mode=None)
    single.command(name, cls=PanelCommand)(built)
    command = typer.main.get_command(single)
    command.name = name
    command.rich_help_panel = entry.panel  # type: ignore[attr-defined]
    return command


class LazyGroup(TyperGroup):
    """A typer group whose commands are built when resolved; listing them imports nothing."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        # What `opd --help` shows: the table's help line, no import.
        return TyperCommand(
            cmd_name, help=entry.help, short_help=entry.help, rich_help_panel=entry.panel
        )

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if name is not None and command is not None:
            command = load_command(name)  # the command is run (or asked for its help)
        return name, command, rest


app = typer.Typer(
    cls=LazyGroup,
    add_completion=False,
    no_args_is_help=True,
    help="opd: on-policy distillation with a teacher scoring service.",
)


@app.callback()
def _root() -> None:
    """The group itself does nothing: every command is in COMMANDS."""


def main() -> Any:
    return app(prog_name="opd")


if __name__ == "__main__":
    main()
