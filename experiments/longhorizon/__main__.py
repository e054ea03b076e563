"""`python -m experiments.longhorizon [--tiny] [--seeds 0,1,2] [--out-dir DIR]` (or `make
longhorizon`): plain OPD vs --horizon adaptive vs --reanchor-prob on the chain-of-additions
task, over several seeds, with the tables and their verdicts in OUT/longhorizon.md.

Research code beside the package, like experiments/replication: it trains its own tiny models
with the replication's tokenizer, so it lives beside the package and runs with the clone's
venv. Its flags are generated from LonghorizonConfig like every `opd` command's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from experiments.longhorizon.run import LonghorizonConfig
from opd.shared.config_cli import config_command


def _run(config: LonghorizonConfig) -> None:
    from rich.console import Console

    from experiments.longhorizon.run import run_longhorizon

    console = Console()
    logging.basicConfig(level=logging.WARNING)
    run_longhorizon(config, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    typer.echo((Path(config.out_dir) / "longhorizon.md").read_text())


def main() -> None:
    app = typer.Typer(add_completion=False)
    app.command()(
        config_command(
            LonghorizonConfig,
            _run,
            doc="Long horizons: trains a teacher on 3-turn chains of additions and a smaller "
            "student, probes the pair by turn and depth, runs plain OPD, --horizon adaptive "
            "and --reanchor-prob on 6-turn episodes per seed, evaluates every model by turn "
            "and writes the tables with their verdicts to OUT/longhorizon.md "
            "(docs/long-horizons.md).",
        )
    )
    app()


if __name__ == "__main__":
    main()
