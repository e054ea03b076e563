"""`pip install .` is the contract plus a light client: importing them pulls no heavy library."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "fastapi", "matplotlib")


def test_client_and_contract_import_without_heavy_libraries():
    code = (
        "import json, sys\n"
        "import opd.client, opd.shared\n"
        "from opd.client import TeacherClient, AsyncTeacherClient\n"
        "from opd.client.teacher import base, errors, replicas, launch\n"
        "from opd.shared import codec, packed, schemas, validation, limits, fingerprint\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_cli_answers_help_without_heavy_libraries():
    """`opd --help`, `opd serve --help` and `opd train --help` import no torch, transformers
    or vLLM: the command table and the configs alone build them (opd.client.cli)."""
    code = (
        "import json, sys\n"
        "from opd.client.cli import main\n"
        "for args in (['--help'], ['serve', '--help'], ['train', '--help']):\n"
        "    sys.argv = ['opd', *args]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (args, exit.code)\n"
        "heavy = ('torch', 'transformers', 'vllm', 'fastapi', 'matplotlib')\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
