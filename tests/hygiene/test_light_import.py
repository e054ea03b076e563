"""`pip install .` is the contract plus a light client: importing them pulls no heavy library."""

from __future__ import annotations

from tests.support.fresh_import import heavy_modules_loaded

HEAVY = ("torch", "transformers", "fastapi", "matplotlib")


def test_client_and_contract_import_without_heavy_libraries():
    code = (
        "import opd.client, opd.shared\n"
        "from opd.client import TeacherClient, AsyncTeacherClient\n"
        "from opd.client.teacher import base, errors, replicas, launch\n"
        "from opd.shared import codec, packed, schemas, validation, limits, fingerprint\n"
    )
    assert heavy_modules_loaded(code, HEAVY) == []


def test_the_cli_answers_help_without_heavy_libraries():
    """`opd --help`, `opd serve --help` and `opd train --help` import no torch, transformers
    or vLLM: the command table and the configs alone build them (opd.client.cli)."""
    code = (
        "from opd.client.cli import main\n"
        "for args in (['--help'], ['serve', '--help'], ['train', '--help']):\n"
        "    sys.argv = ['opd', *args]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (args, exit.code)\n"
    )
    heavy = ("torch", "transformers", "vllm", "fastapi", "matplotlib")
    assert heavy_modules_loaded(code, heavy) == []


def test_the_verl_replica_side_imports_without_heavy_libraries():
    """opd.client.verl's settings, layout and server (the Ray actor behind verl's replica) use
    only the torch-free client: they import no torch, transformers, verl or Ray."""
    code = "from opd.client.verl import layout, server, settings\n"
    assert heavy_modules_loaded(code, (*HEAVY, "verl", "ray")) == []
