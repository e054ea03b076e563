"""The small TrainConfig the trainer tests and the report tests build runs with (tiny models)."""

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
