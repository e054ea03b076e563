"""Each option is declared once: the CLI's flags are generated from the typed configs.

Checked from the outside, through the command as a user runs it: every config field is a flag
with the field's help, no flag exists without a field, a command given only its required flags
builds exactly the config's defaults, a given flag reaches its field, a config file gives values
that flags override, a written config replays, and the help fits an 80-column terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from opd.bench.load import BenchLoadConfig
from opd.bench.runner import BenchConfig
from opd.client.cli import COMMANDS, app, load_command
from opd.client.configs.coldstart import ColdstartConfig
from opd.client.configs.evaluate import EvalConfig
from opd.client.configs.probe import ProbeConfig
from opd.client.configs.select import SelectConfig
from opd.client.configs.train import OPD_STAGE_FLAGS, TrainConfig
from opd.server.settings import Settings
from opd.shared.config_cli import (
    build_config,
    field_at,
    flag_values,
    flags_of,
    from_flags,
    replayable,
    spec_of,
)
from opd.shared.limits import Limits

COMMAND_CONFIGS = {
    "train": TrainConfig,
    "probe": ProbeConfig,
    "coldstart": ColdstartConfig,
    "select-prompts": SelectConfig,
    "serve": Settings,
    "bench": BenchConfig,
    "bench-load": BenchLoadConfig,
    "eval": EvalConfig,
}


def _leaves(model, prefix=()):
    """(field path, FieldInfo) of every scalar field, option groups flattened."""
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            yield from _leaves(ann, (*prefix, name))
        else:
            yield (*prefix, name), info


@pytest.mark.parametrize("name", sorted(COMMAND_CONFIGS))
def test_every_field_is_a_flag_with_its_help(name: str) -> None:
    model = COMMAND_CONFIGS[name]
    spec = spec_of(model)
    not_flags = set(spec.env) | set(spec.exclude)
    options = {p.name: p for p in load_command(name).params if p.name != "config"}
    by_path = {f.path: f for f in flags_of(model)}
    for path, info in _leaves(model):
        if ".".join(path) in not_flags:
            assert path not in by_path
            continue
        option = options[by_path[path].param]
        assert (info.description or "") in (option.help or ""), (path, option.help)
    assert set(options) == {f.param for f in by_path.values()}, "a flag without a field"


def test_train_config_is_composed_of_groups() -> None:
    assert len(TrainConfig.model_fields) <= 25
    groups = {"student", "teacher", "data", "sampling", "objective", "optim", "eval"}
    assert groups <= set(TrainConfig.model_fields)


def test_required_flags_alone_give_the_configs_defaults(monkeypatch) -> None:
    got = []
    monkeypatch.setattr("opd.client.commands.run_train", got.append)
    result = CliRunner().invoke(app, ["train", "--student", "s", "--teacher-url", "http://t"])
    assert result.exit_code == 0, result.output
    want = TrainConfig.model_validate({"student": {"model": "s"}, "teacher": {"url": ["http://t"]}})
    assert got == [want] == [from_flags(TrainConfig, student="s", teacher_url=["http://t"])]


def test_a_given_flag_reaches_its_field_and_bad_values_name_the_flag(monkeypatch) -> None:
    got = []
    monkeypatch.setattr("opd.client.commands.run_train", got.append)
    runner = CliRunner()
    base = ["train", "--student", "s", "--teacher-url", "http://t"]
    result = runner.invoke(
        app,
        [*base, "--objective", "sampled", "--n-rollouts", "3", "--eval-n", "2"]
        + ["--eval-temperature", "1"],
    )
    assert result.exit_code == 0, result.output
    (config,) = got
    assert config.objective.name == "sampled"
    assert config.sampling.n == 3 and config.eval.sampling.n == 2
    result = runner.invoke(app, [*base, "--objective", "jsd", "--clip-eps", "0.2"])
    assert result.exit_code == 2 and "clip_eps" in result.output
    result = runner.invoke(
        app, ["coldstart", "--student", "s", "--teacher-url", "http://t", "--sft-fraction", "1.5"]
    )
    assert result.exit_code == 2 and "--sft-fraction" in result.output
    result = runner.invoke(app, [*base, "--temperature", "0", "--n-rollouts", "2"])
    assert result.exit_code == 2 and "--temperature: " in result.output
    assert "greedy samples are identical" in result.output
    result = runner.invoke(app, ["train", "--teacher-url", "http://t"])
    assert result.exit_code == 2 and "--student" in result.output  # required, from flags or file


def test_coldstart_opd_stage_is_trainconfigs_own_declarations() -> None:
    stage = ColdstartConfig.model_fields["opd"].annotation
    by_param = {f.param: f for f in flags_of(TrainConfig)}
    for name in OPD_STAGE_FLAGS:
        got, want = stage.model_fields[name], field_at(TrainConfig, by_param[name].path)
        assert (got.annotation, got.default, got.description, got.metadata) == (
            want.annotation,
            want.default,
            want.description,
            want.metadata,
        )
    assert from_flags(ColdstartConfig, student="s", teacher_url=["u"], seed=5).sft.seed == 5


def test_in_training_eval_follows_the_rollouts_unless_told() -> None:
    config = from_flags(TrainConfig, student="s", teacher_url=["u"], max_new_tokens=40, top_p=0.9)
    assert (config.eval.sampling.max_tokens, config.eval.sampling.top_p) == (40, 0.9)
    config = from_flags(
        TrainConfig, student="s", teacher_url=["u"], max_new_tokens=40, eval_max_new_tokens=7
    )
    assert config.eval.sampling.max_tokens == 7
    # the resolved values are what the run writes, so a replay answers as long
    assert TrainConfig.model_validate(replayable(config)) == config


def test_settings_nest_limits_with_flat_variables(monkeypatch) -> None:
    monkeypatch.setenv("OPD_MAX_TOP_K", "7")
    settings = Settings(max_sequences=3)
    assert settings.limits == Limits(max_top_k=7, max_sequences=3)
    assert set(Settings.model_fields) & set(Limits.model_fields) == set()


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
def test_a_config_file_gives_values_and_flags_override_it(tmp_path, suffix) -> None:
    values = {"student": {"model": "s"}, "teacher": {"url": ["http://t"]}, "sampling": {"n": 3}}
    path = tmp_path / f"train{suffix}"
    if suffix == ".toml":
        path.write_text(
            '[student]\nmodel = "s"\n[teacher]\nurl = ["http://t"]\n[sampling]\nn = 3\n'
        )
    elif suffix == ".yaml":
        path.write_text("student:\n  model: s\nteacher:\n  url: [http://t]\nsampling:\n  n: 3\n")
    else:
        path.write_text(json.dumps(values))
    flags = flags_of(TrainConfig)
    from_file = build_config(TrainConfig, flags, {}, path)
    assert from_file == TrainConfig.model_validate(values)
    overridden = build_config(TrainConfig, flags, {"n_rollouts": 5, "lr": 0.5}, path)
    assert (overridden.sampling.n, overridden.optim.lr) == (5, 0.5)
    assert overridden.student.model == "s"  # the file's other values stay


def test_a_bad_config_file_is_refused_naming_the_field(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("student:\n  model: s\n  modle: typo\nteacher:\n  url: [http://t]\n")
    with pytest.raises(typer.BadParameter, match=r"student\.modle|--student"):
        build_config(TrainConfig, flags_of(TrainConfig), {}, path)
    path.write_text("- a list\n")
    with pytest.raises(typer.BadParameter, match="mapping"):
        build_config(TrainConfig, flags_of(TrainConfig), {}, path)
    result = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "no such file" in result.output


def test_a_written_config_replays_without_its_secrets(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("OPD_API_KEY", "sk-secret")
    got = []
    monkeypatch.setattr("opd.client.commands.run_train", got.append)
    args = ["train", "--student", "s", "--teacher-url", "http://t", "--objective", "sampled"]
    assert CliRunner().invoke(app, [*args, "--discount", "0.9"]).exit_code == 0
    written = replayable(got[0])
    assert "sk-secret" not in json.dumps(written) and got[0].teacher.api_key == "sk-secret"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(written))
    assert CliRunner().invoke(app, ["train", "--config", str(path)]).exit_code == 0
    assert got[1] == got[0]  # the key comes back from the environment, as it did
    # a report shows the written config in flag names
    shown = flag_values(TrainConfig, written)
    assert shown["objective"] == "sampled" and shown["discount"] == 0.9


def test_every_command_help_fits_80_columns_without_cutting_a_name() -> None:
    env = {**os.environ, "COLUMNS": "80", "TERMINAL_WIDTH": "80"}
    for name in COMMANDS:
        done = subprocess.run(
            [sys.executable, "-m", "opd.client.cli", name, "--help"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0, (name, done.stderr[-2000:])
        lines = done.stdout.splitlines()
        assert all(len(line) <= 80 for line in lines), name
        assert "…" not in done.stdout, name
        for param in load_command(name).params:
            for flag in param.opts:
                assert flag in done.stdout, (name, flag)
