"""`python -m experiments.replication [--tiny] [--out-dir DIR] [--seeds 0,1,2]` (or `make
replicate`): the method's findings reproduced on this machine, from a clone of the repository;
with --seeds, over several seeds, judged by the spread (seeds.py).

The harness is research code, not part of the installed `opd` package: it trains its own tiny
models with its own tokenizer, so it lives beside the package and runs with the clone's venv.
Its flags are generated from ReplicateConfig like every `opd` command's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from experiments.replication.run import ReplicateConfig
from opd.shared.config_cli import config_command


def _run(config: ReplicateConfig) -> None:
    from rich.console import Console

    from experiments.replication.run import run_replicate
    from experiments.replication.seeds import run_seeds

    console = Console()
    logging.basicConfig(level=logging.WARNING)
    run = run_seeds if config.seeds is not None else run_replicate
    run(config, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    typer.echo((Path(config.out_dir) / "replication.md").read_text())


def main() -> None:
    app = typer.Typer(add_completion=False)
    app.command()(
        config_command(
            ReplicateConfig,
            _run,
            doc="The method's findings reproduced on this machine: trains a student and three "
            "teachers on 3-digit addition, runs probe / train / coldstart / eval on them and "
            "writes one table per finding to OUT/replication.md (docs/replication.md); with "
            "--seeds, one run per seed in OUT/seed{S}/ and the tables over the seeds.",
        )
    )
    app()


if __name__ == "__main__":
    main()
