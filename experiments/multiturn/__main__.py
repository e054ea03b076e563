"""`python -m experiments.multiturn [--tiny] [--out-dir DIR]` (or `make multiturn`): the
teacher's signal by turn on the follow-up environment, before and after OPD.

Research code beside the package, like experiments/replication: it fine-tunes its own teacher,
so it lives beside the package and runs with the clone's venv. Its flags are generated from
MultiturnConfig like every `opd` command's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from experiments.multiturn.run import MultiturnConfig
from opd.shared.config_cli import config_command


def _run(config: MultiturnConfig) -> None:
    from rich.console import Console

    from experiments.multiturn.run import run_multiturn

    console = Console()
    logging.basicConfig(level=logging.WARNING)
    run_multiturn(config, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    typer.echo((Path(config.out_dir) / "multiturn.md").read_text())


def main() -> None:
    app = typer.Typer(add_completion=False)
    app.command()(
        config_command(
            MultiturnConfig,
            _run,
            doc="The teacher's signal by turn on the follow-up environment: fine-tunes a "
            "teacher that follows the protocol, takes its layer subset as the student, runs "
            "probe / train / probe / eval and writes per-turn tables before vs after OPD to "
            "OUT/multiturn.md (docs/training.md).",
        )
    )
    app()


if __name__ == "__main__":
    main()
