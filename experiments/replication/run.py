"""`opd replicate`: build the task and the models, then run the six experiments with opd's own
probe, train, coldstart and eval, and write one table per finding.

Every stage is a call of the same function the matching `opd` command runs (run_probe,
Trainer, run_coldstart, run_eval), with its config saved next to its output, and every
teacher is a real `opd serve` process on loopback. The results go to OUT/results.json and
OUT/replication.md (the tables), and `opd report` pages for the OPD runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from experiments.harness import run_metrics, train_opd, write_results
from experiments.replication import task
from experiments.replication.plan import (
    SAME_PIPELINE,
    STUDENT,
    TEACHER_X,
    TEACHER_X_OTHER,
    TEACHER_Y,
    Plan,
    full_plan,
    tiny_plan,
)
from opd.shared.config_cli import from_flags

REPLICATE_VERSION = 1


class ReplicateConfig(BaseModel):
    """`opd replicate`: the method's findings on this machine, in one command."""

    model_config = ConfigDict(extra="forbid")

    out_dir: str = Field(default="runs/replicate", description="models, runs, tables")
    tiny: bool = Field(
        default=False,
        description="toy budgets (about 2 minutes): checks that every stage runs, not the findings",
    )
    seed: int = Field(default=0, description="seed of the data, the models and every run")
    reuse_models: bool = Field(
        default=True,
        description="reuse models in OUT/models trained with the same recipe and held-out set",
    )
    # A comma string, not a list: the generated CLI repeats a list field's flag (--seeds 0
    # --seeds 1), where `--seeds 0,1,2` is what a person types.
    seeds: str | None = Field(
        default=None,
        description="several seeds, comma-separated (0,1,2): each runs as --seed into "
        "OUT/seed{S}/ (reused when finished with the same plan), then the tables over the "
        "seeds with every figure's spread (experiments/replication/seeds.py)",
    )

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: str | None) -> str | None:
        """At least two distinct non-negative integer seeds: one seed is --seed, and a seed
        given twice would count one run twice in the spread."""
        if value is None:
            return None
        try:
            seeds = [int(part) for part in value.split(",")]
        except ValueError:
            raise ValueError(
                f"seeds: expected comma-separated integers such as 0,1,2, got {value!r}"
            ) from None
        if len(seeds) < 2:
            raise ValueError(f"seeds: give at least 2 seeds for a spread (got {value!r}); "
                             "one seed is --seed")  # fmt: skip
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        if twice:
            raise ValueError(f"seeds: {', '.join(map(str, twice))} given more than once")
        if any(s < 0 for s in seeds):
            raise ValueError(f"seeds: must be >= 0 (got {value!r})")
        return ",".join(map(str, seeds))

    @model_validator(mode="after")
    def _seed_or_seeds(self) -> ReplicateConfig:
        """--seed with --seeds would leave one of them ignored."""
        if self.seeds is not None and "seed" in self.model_fields_set:
            raise ValueError("give --seed (one run) or --seeds (several), not both")
        return self

    @property
    def seed_list(self) -> list[int]:
        """The seeds to run: --seeds, or the one --seed."""
        return [int(s) for s in self.seeds.split(",")] if self.seeds else [self.seed]


def plan_for(config: ReplicateConfig) -> Plan:
    """The plan of a single-seed run: what it runs, and what a reused run must have run."""
    return tiny_plan(config.seed) if config.tiny else full_plan(config.seed)


def _data(plan: Plan, out: Path, seed: int) -> tuple[dict[str, Path], set[tuple[int, int]]]:
    """The eval questions, the OPD pool and the cold start's prompts (disjoint sets), and all
    their pairs: no model is trained on any of them."""
    rng = np.random.default_rng(seed)
    eval_pairs = task.sample_pairs(plan.eval_prompts, rng)
    opd_pairs = task.sample_pairs(plan.opd_prompts, rng, exclude=set(eval_pairs))
    cold_pairs = task.sample_pairs(
        plan.coldstart_prompts, rng, exclude=set(eval_pairs) | set(opd_pairs)
    )
    paths = {
        "eval": task.write_rows(eval_pairs, out / "eval.jsonl"),
        "opd": task.write_rows(opd_pairs, out / "opd_prompts.jsonl"),
        "coldstart": task.write_rows(cold_pairs, out / "coldstart_prompts.jsonl"),
    }
    return paths, {*eval_pairs, *opd_pairs, *cold_pairs}


def _models(
    plan: Plan, out: Path, exclude: set[tuple[int, int]], reuse: bool, log: Callable[[str], None]
) -> dict[str, Path]:
    """Every model of the plan: reused from OUT/models when its card matches (same spec, recipe
    version and held-out set), trained otherwise."""
    from experiments.replication.models import RECIPE_VERSION, held_out_digest, train_model

    digest = held_out_digest(exclude)
    dirs = {}
    for spec in plan.models:
        folder = out / spec.name
        card = folder / "opd_replication_model.json"
        if reuse and card.exists():
            saved = json.loads(card.read_text())
            # A field missing from an older card had its default then: a new field's default
            # must keep the old behaviour, or RECIPE_VERSION is bumped with it.
            defaults = {f.name: f.default for f in fields(spec)}
            same_recipe = {k: saved.get(k, defaults[k]) for k in asdict(spec)} == asdict(spec)
            same_version = saved.get("recipe_version") == RECIPE_VERSION
            if same_recipe and same_version and saved.get("held_out_digest") == digest:
                log(f"model {spec.name}: reusing {folder}")
                dirs[spec.name] = folder
                continue
        log(f"model {spec.name}: {spec.role} ({spec.steps} SFT steps)")
        dirs[spec.name] = train_model(spec, folder, exclude, log)
    return dirs


def _train(
    plan: Plan, student: Path, url: str, run_dir: Path, data: dict, seed: int, **flags: Any
) -> Path:
    """One OPD run with the plan's shared budget, evaluated in training every eval_every
    steps (`flags`: more `opd train` settings); returns the final student's folder."""
    return train_opd(
        plan,
        student,
        url,
        data["opd"],
        run_dir,
        seed,
        eval_set=str(data["eval"]),
        eval_every=plan.eval_every,
        eval_verifier="numeric",
        eval_max_new_tokens=plan.max_new_tokens,
        depth_bucket=plan.depth_bucket,
        **flags,
    )


def _serve(names: list[str], models: dict[str, Path], out: Path, stack: ExitStack) -> dict:
    """An `opd serve` process per model, each stopped when `stack` closes; their URLs by name.
    One after another: started side by side on 2 cores they took longer (5 tiny models: 41-45 s
    against 33-36 s), each start being mostly the server's own imports."""
    from opd.client.teacher.launch import LocalTeacher

    urls = {}
    for name in names:
        server = LocalTeacher(str(models[name]), log_path=out / f"serve-{name}.log",
                              env={"OPD_DTYPE": "float32", "OPD_LOG_LEVEL": "warning"})  # fmt: skip
        urls[name] = server.start()
        stack.callback(server.stop)
    return urls


def _probe(
    plan: Plan, student: Path, teachers: dict[str, str], data: dict, out: Path, seed: int
) -> dict[str, Any]:
    """opd probe of `student` against `teachers`, with the depth curve, on held-out questions:
    the after-OPD probe must not measure prompts the run trained on, and before and after
    measure the same ones."""
    from opd.client.configs.groups import TeacherSpec
    from opd.client.configs.probe import ProbeConfig
    from opd.client.recipes.probe import run_probe

    config = from_flags(
        ProbeConfig,
        student=str(student),
        teacher=[TeacherSpec(name=n, urls=[u]) for n, u in teachers.items()],
        prompts=str(data["eval"]),
        answer_field="answer",
        verifier="numeric",
        num_prompts=plan.probe_prompts,
        n_rollouts=plan.n_rollouts,
        max_new_tokens=plan.max_new_tokens,
        student_top_k=plan.top_k,
        teacher_top_k=plan.top_k,
        depth_bucket=plan.depth_bucket,
        depth=True,
        depth_prefix=list(plan.depth_prefixes),
        depth_samples=1,
        depth_temperature=0.0,
        depth_rollouts=plan.depth_rollouts,
        seed=seed,
        out_dir=str(out),
    )
    return run_probe(config, log=lambda _: None)


def _coldstart(plan: Plan, student: Path, url: str, data: dict, out: Path, seed: int) -> Path:
    """SFT on teacher-y's own responses (the paper's recipe: T 0.7, top-p 0.95), no OPD yet."""
    from opd.client.configs.coldstart import ColdstartConfig
    from opd.client.recipes.coldstart import run_coldstart

    config = from_flags(
        ColdstartConfig,
        student=str(student),
        teacher_url=[url],
        prompts=str(data["coldstart"]),
        sft_fraction=0.9,
        seed=seed,
        temperature=0.7,
        top_p=0.95,
        max_tokens=plan.max_new_tokens,
        sft_epochs=plan.coldstart_epochs,
        sft_lr=plan.coldstart_lr,
        sft_batch_size=plan.coldstart_batch,
        sft_max_len=128,
        opd_steps=0,
        out_dir=str(out),
    )
    summary = run_coldstart(config, log=lambda _: None)
    return Path(summary["student_out"])


def _evaluate(plan: Plan, students: dict[str, Path], data: dict, out: Path, seed: int) -> dict:
    """Greedy accuracy of every model on the same held-out questions, by label."""
    from opd.client.configs.evaluate import EvalConfig
    from opd.client.recipes.evaluate import run_eval

    labels = list(students)
    report = run_eval(
        from_flags(
            EvalConfig,
            data=str(data["eval"]),
            verifier="numeric",
            student=[str(students[k]) for k in labels],
            max_tokens=plan.max_new_tokens,
            seed=seed,
            out_dir=str(out),
        ),
        log=lambda _: None,
    )
    rows = [s for s in report["sources"] if s["kind"] == "student"]
    return {
        label: {
            "accuracy": s["summary"]["mean_at_n"],
            "ci": s["summary"]["mean_at_n_interval"],
            # eval names a model by its folder ("model", "model-2", ...): say which file is whose
            "per_prompt": f"{out.name}/{s['per_prompt']}",
        }
        for label, s in zip(labels, rows, strict=True)
    }


def run_replicate(config: ReplicateConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every stage in order; OUT/results.json and OUT/replication.md at the end. One seed:
    several (config.seeds) are seeds.run_seeds, which calls this once per seed."""
    from experiments.replication.tables import write_tables
    from opd.client.report.build import build_report

    if config.seeds is not None:
        raise ValueError("run_replicate runs one seed; --seeds is seeds.run_seeds")
    started = time.perf_counter()
    plan = plan_for(config)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = config.seed
    data, held_out = _data(plan, out / "data", seed)
    models = _models(plan, out / "models", held_out, config.reuse_models, log)
    timing: dict[str, float] = {"models_s": round(time.perf_counter() - started, 1)}
    runs = out / "runs"
    results: dict[str, Any] = {"version": REPLICATE_VERSION, "tiny": config.tiny, "seed": seed}
    with ExitStack() as stack:
        t0 = time.perf_counter()
        urls = _serve([spec.name for spec in plan.models], models, out, stack)
        timing["serve_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        log("probe: the student's rollouts scored by every teacher (and by itself)")
        probe_teachers = {n: urls[n] for n in (TEACHER_X, TEACHER_Y, SAME_PIPELINE, STUDENT)}
        results["probe_before"] = _probe(
            plan, models[STUDENT], probe_teachers, data, out / "probe-before", seed
        )
        timing["probe_before_s"] = round(time.perf_counter() - t0, 1)
        finals: dict[str, Path] = {}
        for label, student, teacher in (
            ("opd-from-x", STUDENT, TEACHER_X),
            ("opd-from-y", STUDENT, TEACHER_Y),
            ("opd-from-same-pipeline", STUDENT, SAME_PIPELINE),
            ("opd-from-self", STUDENT, STUDENT),
            ("reverse", TEACHER_X, STUDENT),  # a weaker teacher, a stronger student
        ):
            log(f"opd train {label}: {student} <- {teacher}, {plan.opd_steps} steps")
            t0 = time.perf_counter()
            finals[label] = _train(plan, models[student], urls[teacher], runs / label, data, seed)
            timing[f"{label}_s"] = round(time.perf_counter() - t0, 1)
        log("opd coldstart: SFT on teacher-y's responses, then OPD from teacher-y")
        t0 = time.perf_counter()
        cold = _coldstart(plan, models[STUDENT], urls[TEACHER_Y], data, out / "coldstart", seed)
        finals["coldstart-sft"] = cold
        finals["coldstart+opd-from-y"] = _train(
            plan, cold, urls[TEACHER_Y], runs / "coldstart+opd-from-y", data, seed
        )
        timing["coldstart_s"] = round(time.perf_counter() - t0, 1)
        log("probe after OPD from teacher-x (depth, late in training)")
        t0 = time.perf_counter()
        results["probe_after"] = _probe(
            plan, finals["opd-from-x"], {TEACHER_X: urls[TEACHER_X]}, data,
            out / "probe-after", seed,
        )  # fmt: skip
        timing["probe_after_s"] = round(time.perf_counter() - t0, 1)
        # Last, so every stage before runs exactly as it did before this run was added.
        label = "opd-from-x-other-tokenizer"
        log(f"opd train {label}: {STUDENT} <- {TEACHER_X_OTHER} across tokenizers, "
            f"{plan.opd_steps} steps")  # fmt: skip
        t0 = time.perf_counter()
        finals[label] = _train(
            plan, models[STUDENT], urls[TEACHER_X_OTHER], runs / label, data, seed,
            cross_tokenizer="auto",
        )  # fmt: skip
        timing[f"{label}_s"] = round(time.perf_counter() - t0, 1)
    log("opd eval: every model on the held-out questions")
    t0 = time.perf_counter()
    results["accuracy"] = _evaluate(plan, {**models, **finals}, data, out / "eval", seed)
    results["runs"] = {
        label: run_metrics(runs / label) for label in finals if label != "coldstart-sft"
    }
    timing["eval_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    for label in results["runs"]:
        build_report(runs / label)
    build_report(out / "probe-before")
    timing["reports_s"] = round(time.perf_counter() - t0, 1)
    return write_results(results, timing, plan, started, write_tables, out / "replication.md", log)
