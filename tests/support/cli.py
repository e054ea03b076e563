"""A throwaway typer app holding only `opd select-prompts`, registered as client/cli.py does."""

from __future__ import annotations

import typer

from opd.client.recipes.select_prompts import select_prompts_command


def select_prompts_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A throwaway app: the CLI owner registers the command the same way."""

    app.command("select-prompts")(select_prompts_command)
    return app
