"""Each option is declared once: the CLI's flags are generated from the typed configs.

Checked from the outside, through the command as a user runs it: every config field is a flag
with the field's help, no flag exists without a field, a command given only its required flags
builds exactly the config's defaults, and a given flag reaches its field."""

from __future__ import annotations

import pytest
import typer.main

from opd.bench.runner import BenchConfig
from opd.client.cli import app
from opd.client.config_cli import flags_of
from opd.client.recipes.coldstart import ColdstartConfig
from opd.client.recipes.evaluate import EvalConfig
from opd.client.recipes.probe import ProbeConfig
from opd.client.recipes.select_prompts import SelectConfig
from opd.client.train.config import OPD_STAGE_FIELDS, TrainConfig
from opd.server.settings import Settings
from opd.shared.limits import Limits

COMMANDS = {
    "train": (TrainConfig, {"api_key"}),
    "probe": (ProbeConfig, {"api_key"}),
    "coldstart": (ColdstartConfig, {"api_key", "sft.seed"}),
    "select-prompts": (SelectConfig, {"api_key"}),
    "serve": (Settings, {"api_key"}),
    "bench": (BenchConfig, set()),
    "eval": (EvalConfig, {"api_key"}),
}


def _command(name: str):
    group = typer.main.get_command(app)
    return group.commands[name]  # type: ignore[attr-defined]


def _leaves(model, prefix=""):
    """(dotted field path, FieldInfo) of every scalar field, nested models flattened."""
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            yield from _leaves(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_field_is_a_flag_with_its_help(name: str) -> None:
    model, not_flags = COMMANDS[name]
    options = {p.name: p for p in _command(name).params}  # every param is a generated option
    flags = flags_of(
        model,
        exclude=[n for n in not_flags if "." in n],
        env={n: "X" for n in not_flags if "." not in n},
        nested={"filters": "", "sft": "sft_", "opd": "opd_", "limits": "", "workload": ""},
    )
    by_path = {".".join(f.path): f for f in flags}
    for path, info in _leaves(model):
        if path in not_flags:
            assert path not in by_path
            continue
        flag = by_path[path]
        option = options[flag.param]
        assert (info.description or "") in (option.help or ""), (path, option.help)
    assert set(options) == {f.param for f in flags}, "a flag without a field, or the reverse"


def test_required_flags_alone_give_the_configs_defaults(monkeypatch) -> None:
    got = {}
    monkeypatch.setattr("opd.client.cli.run_train", lambda c: got.setdefault("train", c))
    from opd.client import cli

    command = cli.config_command(TrainConfig, cli.run_train, doc="x", env=cli.API_KEY_ENV)
    # call the generated function the way typer does, with only the required flags given
    params = {f.param: None for f in command.flags}
    params.update(student="s", teacher_url=["http://t"])
    command(**params)
    assert got["train"] == TrainConfig(student="s", teacher_url=["http://t"])


def test_a_given_flag_reaches_its_field_and_bad_values_name_the_flag(monkeypatch) -> None:
    from typer.testing import CliRunner

    seen = []
    monkeypatch.setattr("opd.client.train.trainer.Trainer", lambda config: seen.append(config))
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train",
            "--student",
            "s",
            "--teacher-url",
            "http://t",
            "--objective",
            "jsd",
            "--clip-eps",
            "0.2",
        ],  # fmt: skip
    )
    assert result.exit_code == 2 and "clip_eps" in result.output
    result = runner.invoke(
        app, ["coldstart", "--student", "s", "--teacher-url", "http://t", "--sft-fraction", "1.5"]
    )
    assert result.exit_code == 2 and "--sft-fraction" in result.output


def test_coldstart_opd_stage_is_trainconfig_fields() -> None:
    stage = ColdstartConfig.model_fields["opd"].annotation
    for name in OPD_STAGE_FIELDS:
        got, want = stage.model_fields[name], TrainConfig.model_fields[name]
        assert (got.annotation, got.default, got.description, got.metadata) == (
            want.annotation,
            want.default,
            want.description,
            want.metadata,
        )
    assert ColdstartConfig(student="s", teacher_url=["u"], seed=5).sft.seed == 5


def test_settings_nest_limits_with_flat_variables(monkeypatch) -> None:
    monkeypatch.setenv("OPD_MAX_TOP_K", "7")
    settings = Settings(max_sequences=3)
    assert settings.limits == Limits(max_top_k=7, max_sequences=3)
    assert set(Settings.model_fields) & set(Limits.model_fields) == set()
