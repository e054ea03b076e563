"""What the research harnesses (experiments.replication, experiments.multiturn,
experiments.longhorizon) share: reading a run's metrics, the per-turn accuracy of graded
episodes, and writing the study's results (tables and results.json) with its timing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any


def run_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """An `opd train` run's metrics.jsonl lines."""
    from opd.client.train.metric_log import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def train_opd(
    plan: Any, student: Path, url: str, prompts: Path, run_dir: Path, seed: int, **flags: Any
) -> Path:
    """One `opd train` run with a study's shared budget (the plan's steps, prompts per step,
    rollouts, tokens, k and lr; one checkpoint at the end, metrics.jsonl only) and the study's
    own `flags`; returns the final student's folder."""
    from opd.client.configs.train import TrainConfig
    from opd.client.train.trainer import Trainer
    from opd.shared.config_cli import from_flags

    config = from_flags(
        TrainConfig,
        student=str(student),
        teacher_url=[url],
        prompts=str(prompts),
        seed=seed,
        max_steps=plan.opd_steps,
        prompts_per_step=plan.prompts_per_step,
        n_rollouts=plan.n_rollouts,
        max_new_tokens=plan.max_new_tokens,
        student_top_k=plan.top_k,
        teacher_top_k=plan.top_k,
        lr=plan.lr,
        checkpoint_every=plan.opd_steps,
        keep_checkpoints=1,
        run_dir=str(run_dir),
        logger=["jsonl"],
        **flags,
    )
    with Trainer(config) as trainer:
        trainer.run()
    return run_dir / "checkpoints" / f"step_{plan.opd_steps}" / "model"


def write_results(
    results: dict[str, Any],
    timing: dict[str, float],
    plan: Any,
    started: float,
    write_tables: Callable[[dict[str, Any], Path], Any],
    tables_path: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Finish a study: the total time, the plan and the tables' verdicts into `results`, the
    tables to `tables_path`, every number to results.json beside it (nan as null)."""
    from opd.client.train.metric_log import finite_json

    timing["total_s"] = round(time.perf_counter() - started, 1)
    results["timing"] = timing
    results["plan"] = asdict(plan)
    results["verdicts"] = write_tables(results, tables_path)
    (tables_path.parent / "results.json").write_text(json.dumps(finite_json(results), indent=1))
    log(f"wrote {tables_path} in {timing['total_s']:.0f} s")
    return results


def turn_accuracy(graded: list[list[bool]], turns: int) -> dict[str, Any]:
    """Per turn index j: the share of all episodes that answered turn j right (a turn never
    reached, after a truncated one, counts as wrong, as in the environment's reward), with a
    Wilson 95% interval; the episode success (every turn right, Wilson) and the reward (the
    share of turns right, bootstrap over episodes). `graded`: per episode, its turns' grades."""
    from opd.client.evaluation.stats import bootstrap_interval, wilson_interval

    n = len(graded)
    by_turn = []
    for j in range(turns):
        right = sum(1 for g in graded if len(g) > j and g[j])
        by_turn.append(
            {"turn": j, "right": right, "episodes": n,
             "accuracy": right / n if n else float("nan"), "ci": list(wilson_interval(right, n))}
        )  # fmt: skip
    full = sum(1 for g in graded if len(g) == turns and all(g))
    return {
        "by_turn": by_turn,
        "episode_success": {
            "right": full,
            "episodes": n,
            "accuracy": full / n if n else float("nan"),
            "ci": list(wilson_interval(full, n)),
        },  # fmt: skip
        "reward_mean": sum(sum(g) for g in graded) / (n * turns) if n else float("nan"),
        # bootstrap over episodes: an episode's turns are not independent draws
        "reward_ci": list(bootstrap_interval([sum(g) / turns for g in graded])),
    }
