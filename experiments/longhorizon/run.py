"""`python -m experiments.longhorizon`: per seed, build the chain task and the pair, probe the
initial pair by turn and depth, run the three OPD arms (plain, --horizon adaptive,
--reanchor-prob) on the same seed, budget and teacher process, evaluate every model by turn;
then the tables over the seeds.

Every stage is a call of the same function the matching `opd` command runs (run_probe,
Trainer, run_eval), with its config saved next to its output, and the teacher is a real
`opd serve` process on loopback, one per seed, shared by the probe and the three arms. Each
seed's numbers go to OUT/seed{S}/results.json (a finished seed with the same plan is reused, so
an interrupted study resumes where it stopped); the tables over the seeds to OUT/longhorizon.md
and every number to OUT/results.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from experiments.harness import run_metrics, train_opd, turn_accuracy, write_results
from experiments.longhorizon import task
from experiments.longhorizon.plan import (
    ADAPTIVE,
    ARMS,
    PLAIN,
    REANCHOR,
    STUDENT,
    TEACHER,
    Plan,
    full_plan,
    tiny_plan,
)
from opd.shared.config_cli import from_flags

LONGHORIZON_VERSION = 1
ENV = "experiments.longhorizon.env:ChainEnv"
# The teacher server's environment: float32 like the trainer's student (threads: --threads).
SERVE_ENV = {"OPD_DTYPE": "float32", "OPD_LOG_LEVEL": "warning"}


def serve_env(threads: int) -> dict[str, str]:
    return {**SERVE_ENV, "OPD_TORCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}


class LonghorizonConfig(BaseModel):
    """The long-horizon features (adaptive horizon, re-anchoring) against plain OPD."""

    model_config = ConfigDict(extra="forbid")

    out_dir: str = Field(default="runs/longhorizon", description="models, runs, tables")
    tiny: bool = Field(
        default=False,
        description="toy budgets (about 2 minutes): checks that every stage runs, not the findings",
    )
    # A comma string, not a list: the generated CLI repeats a list field's flag, where
    # `--seeds 0,1,2` is what a person types.
    seeds: str = Field(
        default="0,1,2",
        description="comma-separated seeds; each has its own data, pair and runs in "
        "OUT/seed{S}/ (reused when finished with the same plan)",
    )
    reuse: bool = Field(
        default=True,
        description="reuse finished seeds and trained models in OUT with the same plan",
    )
    threads: int = Field(
        default=1,
        ge=1,
        description="torch threads of this process and of the teacher server: the models are "
        "tiny, so a second thread buys little, and on a busy machine it costs a lot (HF "
        "generate of the student: 8 ms a token with 1 thread, 245 ms with 2 while other jobs "
        "ran)",
    )

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: str) -> str:
        """Distinct non-negative integers: a seed given twice would count one run twice."""
        try:
            seeds = [int(part) for part in value.split(",")]
        except ValueError:
            raise ValueError(f"seeds: expected comma-separated integers, got {value!r}") from None
        if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
            raise ValueError(f"seeds: distinct integers >= 0, got {value!r}")
        return ",".join(map(str, seeds))

    @property
    def seed_list(self) -> list[int]:
        return [int(s) for s in self.seeds.split(",")]


def plan_for(config: LonghorizonConfig, seed: int) -> Plan:
    return tiny_plan(seed) if config.tiny else full_plan(seed)


def _data(plan: Plan, out: Path, seed: int) -> tuple[dict[str, Path], set[tuple[int, ...]]]:
    """The held-out evaluation rows (the probe takes their first rows) and the OPD pool, with
    distinct openings; no model's SFT chain opens like any of them."""
    rng = np.random.default_rng(seed)
    eval_chains = task.sample_chains(plan.eval_episodes, plan.turns, rng)
    opd_chains = task.sample_chains(
        plan.opd_rows, plan.turns, rng, exclude=task.openings(eval_chains)
    )
    paths = {
        "eval": task.write_rows(eval_chains, out / "eval.jsonl"),
        "probe": task.write_rows(eval_chains[: plan.probe_rows], out / "probe.jsonl"),
        "opd": task.write_rows(opd_chains, out / "opd.jsonl"),
    }
    return paths, task.openings(eval_chains) | task.openings(opd_chains)


def env_flags(plan: Plan) -> dict[str, Any]:
    """--env, its turns, and the episode limits every stage shares."""
    return {
        "env": ENV,
        "env_arg": [f"turns={plan.turns}"],
        "max_turns": plan.turns,
        "max_episode_tokens": plan.max_episode_tokens,
    }


def arm_flags(plan: Plan, arm: str) -> dict[str, Any]:
    """What distinguishes an arm's `opd train` flags (everything else is shared)."""
    if arm == PLAIN:
        return {"horizon": "none"}
    if arm == ADAPTIVE:
        return {
            "horizon": "adaptive",
            "horizon_bucket": plan.horizon_bucket,
            "horizon_fade": plan.horizon_fade,
            "horizon_smoothing": plan.horizon_smoothing,
            "horizon_warmup_steps": plan.horizon_warmup_steps,
            "horizon_min_tokens": plan.horizon_min_tokens,
            "horizon_regrow_steps": plan.horizon_regrow_steps,
        }
    if arm == REANCHOR:
        return {
            "horizon": "none",
            "reanchor_prob": plan.reanchor_prob,
            "reanchor_decay_steps": plan.opd_steps,
            "reanchor_as": plan.reanchor_as,
        }
    raise ValueError(f"unknown arm {arm!r}")


def _train(
    plan: Plan, arm: str, student: Path, url: str, data: dict, run_dir: Path, seed: int
) -> Path:
    """One arm's `opd train --env`: the shared budget and objective (student-topk, k = 4),
    the arm's flags; returns the final student's folder."""
    return train_opd(
        plan,
        student,
        url,
        data["opd"],
        run_dir,
        seed,
        depth_bucket=plan.depth_bucket,
        **env_flags(plan),
        **arm_flags(plan, arm),
    )


def _probe(plan: Plan, student: Path, url: str, data: dict, out: Path, seed: int) -> dict:
    """opd probe --env of the initial pair: the student's sampled episodes scored by the
    teacher, the diagnostics by turn and by depth bucket; with the horizon knobs where this
    opd's probe takes them (it then recommends a horizon)."""
    from opd.client.configs.groups import TeacherSpec
    from opd.client.configs.probe import ProbeConfig
    from opd.client.recipes.probe import run_probe

    knobs: dict[str, Any] = {}
    if "horizon" in ProbeConfig.model_fields:
        knobs = {
            "horizon_bucket": plan.horizon_bucket,
            "horizon_fade": plan.horizon_fade,
            "horizon_min_tokens": plan.horizon_min_tokens,
        }
    config = from_flags(
        ProbeConfig,
        student=str(student),
        teacher=[TeacherSpec(name=TEACHER, urls=[url])],
        prompts=str(data["probe"]),
        num_prompts=plan.probe_rows,
        n_rollouts=plan.probe_rollouts,
        max_new_tokens=plan.max_new_tokens,
        student_top_k=plan.top_k,
        teacher_top_k=plan.top_k,
        depth_bucket=plan.depth_bucket,
        seed=seed,
        out_dir=str(out),
        **knobs,
        **env_flags(plan),
    )
    return run_probe(config, log=lambda _: None)


def _evaluate(plan: Plan, models: dict[str, Path], data: dict, out: Path, seed: int) -> dict:
    """opd eval --env: greedy episodes of every model on the same held-out rows, each loaded
    as a local model (the teacher too: it is an HF folder, and a local greedy pass costs less
    than one over HTTP); per label, the per-turn accuracy read from its per-prompt file."""
    from opd.client.configs.evaluate import EvalConfig
    from opd.client.recipes.evaluate import run_eval

    labels = list(models)
    report = run_eval(
        from_flags(
            EvalConfig,
            data=str(data["eval"]),
            limit=plan.eval_episodes,
            verifier="numeric",
            student=[str(models[k]) for k in labels],
            max_tokens=plan.max_new_tokens,
            seed=seed,
            out_dir=str(out),
            **env_flags(plan),
        ),
        log=lambda _: None,
    )
    sources = [s for s in report["sources"] if s["kind"] == "student"]
    result = {}
    for label, source in zip(labels, sources, strict=True):
        lines = (out / source["per_prompt"]).read_text().splitlines()
        graded = [json.loads(line)["turn_correct"][0] for line in lines]
        result[label] = {
            **turn_accuracy(graded, plan.turns),
            "per_prompt": f"{out.name}/{source['per_prompt']}",
        }
    return result


def _sum(run: list[dict], key: str) -> float:
    return float(sum(m[key] for m in run if isinstance(m.get(key), int | float)))


def compute_summary(run: list[dict], wall_s: float) -> dict[str, float]:
    """One arm's compute from its per-step metrics: the positions the teacher scored (and the
    student trained: tokens/count after the horizon's cut), the positions sampled, the
    teacher's request time, the steps' and the whole run's wall time, the tokens the teacher
    wrote (re-anchoring) and the horizon at the end (0: none)."""
    scored = _sum(run, "tokens/count")
    cut = _sum(run, "horizon/positions_cut")
    last = run[-1] if run else {}
    return {
        "teacher_positions": scored,
        "sampled_positions": scored + cut,
        "cut_frac": cut / (scored + cut) if scored + cut else 0.0,
        "teacher_score_s": _sum(run, "time/score_s"),
        "score_wait_s": _sum(run, "time/score_wait_s"),
        # the student's sampling, and with re-anchoring the teacher's written turns too: the
        # trainer logs no separate time for those (they are /v1/generate calls inside a turn)
        "generate_s": _sum(run, "time/generate_s"),
        "step_s": _sum(run, "time/step_s"),
        "run_wall_s": wall_s,
        "teacher_written_tokens": _sum(run, "reanchor/teacher_tokens"),
        "final_horizon_tokens": float(last.get("horizon/tokens", 0.0)),
        "steps": float(len(run)),
    }


def run_seed(
    config: LonghorizonConfig, seed: int, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """One seed's whole study into OUT/seed{S}/ (its results.json; reused when finished with
    the same plan)."""
    from experiments.longhorizon.models import card, train_model
    from opd.client.teacher.launch import LocalTeacher

    plan = plan_for(config, seed)
    out = Path(config.out_dir) / f"seed{seed}"
    saved = out / "results.json"
    if config.reuse and saved.is_file():
        done = json.loads(saved.read_text())
        same = done.get("plan") == json.loads(json.dumps(asdict(plan)))
        if same and done.get("version") == LONGHORIZON_VERSION and done.get("tiny") == config.tiny:
            log(f"seed {seed}: reusing {saved}")
            return done
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timing[f"{name}_s"] = round(time.perf_counter() - t0, 1)

    data, held_out = _data(plan, out / "data", seed)
    t0 = time.perf_counter()
    models = {
        spec.name: train_model(spec, out / "models" / spec.name, held_out, config.reuse, log)
        for spec in plan.models
    }
    lap("models", t0)
    results: dict[str, Any] = {
        "version": LONGHORIZON_VERSION, "tiny": config.tiny, "seed": seed,
        "cards": {name: card(folder) for name, folder in models.items()},
    }  # fmt: skip
    finals: dict[str, Path] = {}
    walls: dict[str, float] = {}
    with ExitStack() as stack:
        t0 = time.perf_counter()
        server = LocalTeacher(str(models[TEACHER]), log_path=out / "serve-teacher.log",
                              env=serve_env(config.threads))  # fmt: skip
        url = server.start()
        stack.callback(server.stop)
        lap("serve", t0)
        t0 = time.perf_counter()
        log(f"seed {seed}: probe --env of the initial pair (by turn, by depth)")
        results["probe"] = _probe(plan, models[STUDENT], url, data, out / "probe", seed)
        lap("probe", t0)
        for arm in ARMS:
            log(f"seed {seed}: opd train {arm}: {plan.opd_steps} steps")
            t0 = time.perf_counter()
            finals[arm] = _train(plan, arm, models[STUDENT], url, data, out / "runs" / arm, seed)
            lap(f"train_{arm}", t0)
            walls[arm] = timing[f"train_{arm}_s"]
    t0 = time.perf_counter()
    log(f"seed {seed}: opd eval --env: teacher, student, the three arms (greedy)")
    results["accuracy"] = _evaluate(plan, {**models, **finals}, data, out / "eval", seed)
    lap("eval", t0)
    results["runs"] = {arm: run_metrics(out / "runs" / arm) for arm in ARMS}
    results["compute"] = {arm: compute_summary(results["runs"][arm], walls[arm]) for arm in ARMS}
    timing["total_s"] = round(time.perf_counter() - started, 1)
    results["timing"] = timing
    results["plan"] = asdict(plan)
    from opd.client.train.metric_log import finite_json

    saved.write_text(json.dumps(finite_json(results), indent=1))
    log(f"seed {seed}: done in {timing['total_s']:.0f} s")
    return json.loads(saved.read_text())


def run_longhorizon(
    config: LonghorizonConfig, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every seed in order, then OUT/longhorizon.md and OUT/results.json over the seeds."""
    import torch

    from experiments.longhorizon.tables import write_tables

    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = config.seed_list
    per_seed: dict[str, Any] = {}
    timing: dict[str, float] = {}
    for seed in seeds:
        t0 = time.perf_counter()
        per_seed[str(seed)] = run_seed(config, seed, log)
        timing[f"seed{seed}_s"] = round(time.perf_counter() - t0, 1)
    results = {
        "version": LONGHORIZON_VERSION,
        "tiny": config.tiny,
        "seeds": seeds,
        "per_seed": per_seed,
    }
    # the plan of the first seed stands for all: they differ only in the seeds they carry
    return write_results(
        results, timing, plan_for(config, seeds[0]), started, write_tables,
        out / "longhorizon.md", log,
    )  # fmt: skip
