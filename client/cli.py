"""The `opd` command line.

    opd serve [--model PATH_OR_ID] [--dtype ...] [--device ...] [--port 8000]
    opd quickstart          # teacher on the embedded SmolLM2 + a scored example, no flags

Server-side imports (torch, FastAPI) happen inside the commands that need them, so the client
install stays light.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="opd: on-policy distillation with a teacher scoring service.",
)


@app.command()
def serve(
    model: Annotated[
        str | None, typer.Option(help="local folder or hub id; default: embedded SmolLM2")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="auto|float32|bfloat16|float16")] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda|cuda:N")] = None,
    host: Annotated[str | None, typer.Option(help="bind address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default 8000)")] = None,
    backend: Annotated[str | None, typer.Option(help="hf")] = None,
    max_batch_tokens: Annotated[int | None, typer.Option(help="padded tokens per pass")] = None,
) -> None:
    """Serve a teacher model over HTTP. Every OPD_* variable applies; flags override them."""
    from opd.server.serve import run_server
    from opd.server.settings import Settings

    overrides = {
        k: v
        for k, v in {
            "model": model,
            "dtype": dtype,
            "device": device,
            "host": host,
            "port": port,
            "backend": backend,
            "max_batch_tokens": max_batch_tokens,
        }.items()
        if v is not None
    }
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_server(settings)


@app.command()
def quickstart(
    prompt: Annotated[str, typer.Option(help="user message of the scored example")] = (
        "What is the capital of France?"
    ),
) -> None:
    """Start the embedded teacher in its own process and score an example conversation."""
    from opd.client.quickstart import run_quickstart

    run_quickstart(prompt)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
