"""The small TrainConfig the trainer tests and the report tests build runs with (tiny models),
and the `opd train` command line of a run for the tests that start it as a process."""

from __future__ import annotations

from pathlib import Path

from opd.client.configs.train import TrainConfig
from opd.shared.config_cli import from_flags


def train_config(student: Path, url: str | list[str], run_dir: Path, **overrides) -> TrainConfig:
    """The config from `opd train` flag names (overrides too: n_rollouts=2, lr=1e-3)."""
    values = dict(
        student=str(student),
        teacher_url=[url] if isinstance(url, str) else url,
        prompts="shipped",
        run_dir=str(run_dir),
        seed=3,
        max_steps=4,
        prompts_per_step=2,
        n_rollouts=2,
        max_new_tokens=8,
        lr=1e-3,
        checkpoint_every=2,
        depth_bucket=4,
        logger=["jsonl"],
    )
    values.update(overrides)
    return from_flags(TrainConfig, **values)


def train_args(student: Path, url: str, run_dir: Path, **flags: object) -> list[str]:
    """`opd train`'s arguments (from `train` on) from flag names: max_steps=2 gives
    --max-steps 2, save_rollouts=True the bare --save-rollouts."""
    args = ["train", "--student", str(student), "--teacher-url", url, "--run-dir", str(run_dir)]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args
