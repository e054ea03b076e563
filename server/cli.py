"""`opd serve`: the teacher service's command, built from Settings (every OPD_* variable
applies; flags override them). The `opd` CLI loads this module only to run or describe it."""

from __future__ import annotations

import logging
from typing import Any

from opd.server.settings import Settings
from opd.shared.config_cli import config_command


def serve_command() -> Any:
    return config_command(
        Settings,
        run_serve,
        doc="Serve a teacher model over HTTP. Every OPD_* variable applies; flags override "
        "them. The API key comes from OPD_API_KEY.",
    )


def run_serve(settings: Settings) -> None:
    from opd.server.serve import run_server

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    run_server(settings)
