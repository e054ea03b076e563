"""`python -m experiments.multiturn`: build the pair, then measure the teacher's signal by turn
before and after OPD on the follow-up environment, with opd's own probe, train and eval.

Every stage is a call of the same function the matching `opd` command runs (run_probe,
Trainer, run_eval), and the teacher is a real `opd serve` process on loopback. The results go
to OUT/results.json and OUT/multiturn.md (the tables, computed from the measurements).
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from experiments.harness import run_metrics, train_opd, turn_accuracy, write_results
from experiments.multiturn.plan import Plan, full_plan, tiny_plan
from opd.shared.config_cli import from_flags

MULTITURN_VERSION = 1
ENV = "followup"
EVAL_ENV_SEED = 0  # FollowupEnv's seed for everything but the teacher's SFT episodes


class MultiturnConfig(BaseModel):
    """The teacher's signal by turn on the follow-up environment, before and after OPD."""

    model_config = ConfigDict(extra="forbid")

    out_dir: str = Field(default="runs/multiturn", description="models, runs, tables")
    tiny: bool = Field(
        default=False,
        description="toy budgets (about 2-3 minutes): checks that every stage runs, not the "
        "findings",
    )
    seed: int = Field(default=0, description="seed of the data order, the runs and the probes")
    rollout_engine: Literal["auto", "hf", "vllm"] = Field(
        default="auto",
        description="who samples the student: auto = vllm when installed (hf in --tiny, where "
        "an engine's start-up would dominate)",
    )
    reuse_models: bool = Field(
        default=True,
        description="reuse the teacher and student in OUT/models built with the same recipe",
    )


def _rows(split: str, n: int) -> list[dict]:
    """Generated rows: FollowupEnv plans an episode from a hash of the row and its seed, so a
    row's text only has to be unique. The answer field is for `opd eval`'s loader; the
    environment grades every turn itself."""
    return [
        {"prompt": f"follow-up episode {split}-{i:05d}", "answer": "graded by the environment"}
        for i in range(n)
    ]


def _write(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data(plan: Plan, out: Path) -> dict[str, Path]:
    """Disjoint rows for the teacher's SFT, the OPD pool and the held-out evaluation (the
    probes use the first rows of the evaluation set)."""
    opd = plan.opd_steps * plan.prompts_per_step
    held_out = max(plan.eval_episodes, plan.probe_prompts)
    return {
        "sft": _write(_rows("sft", plan.sft_steps * plan.sft_batch), out / "sft.jsonl"),
        "opd": _write(_rows("opd", opd), out / "opd_prompts.jsonl"),
        "eval": _write(_rows("eval", held_out), out / "eval.jsonl"),
        "probe": _write(_rows("eval", plan.probe_prompts), out / "probe.jsonl"),
    }


def _env_flags(plan: Plan) -> dict[str, Any]:
    return {
        "env": ENV,
        "env_arg": [f"turns={plan.turns}", f"seed={EVAL_ENV_SEED}"],
        "max_turns": plan.turns,
    }


def _probe(plan: Plan, student: Path, url: str, data: dict, engine: str, out: Path, seed: int):
    """opd probe --env --depth: the student's sampled episodes scored by the teacher (the
    diagnostics by turn) and the teacher-continuation probe from each turn in depth_turns."""
    from opd.client.configs.groups import TeacherSpec
    from opd.client.configs.probe import ProbeConfig
    from opd.client.recipes.probe import run_probe

    config = from_flags(
        ProbeConfig,
        student=str(student),
        rollout_engine=engine,
        teacher=[TeacherSpec(name="teacher", urls=[url])],
        prompts=str(data["probe"]),
        num_prompts=plan.probe_prompts,
        n_rollouts=plan.probe_rollouts,
        max_new_tokens=plan.max_new_tokens,
        student_top_k=plan.top_k,
        teacher_top_k=plan.top_k,
        depth=True,
        depth_prefix=list(plan.depth_turns),
        depth_samples=1,
        depth_temperature=0.0,
        depth_rollouts=plan.depth_rollouts,
        seed=seed,
        out_dir=str(out),
        **_env_flags(plan),
    )
    return run_probe(config, log=lambda _: None)


def _train(plan: Plan, student: Path, url: str, data: dict, engine: str, run_dir: Path, seed: int):
    """opd train --env followup with the sampled objective (the quickstart's); returns the final
    student's folder."""
    return train_opd(
        plan,
        student,
        url,
        data["opd"],
        run_dir,
        seed,
        objective="sampled",
        rollout_engine=engine,
        **_env_flags(plan),
    )


def _evaluate(
    plan: Plan, students: dict[str, Path], url: str, data: dict, engine: str, out: Path, seed: int
) -> dict[str, Any]:
    """opd eval --env: greedy episodes of every student and of the teacher on the same held-out
    rows; per label, the per-turn accuracy and the episode success read from its per-prompt
    file."""
    from opd.client.configs.evaluate import EvalConfig
    from opd.client.configs.groups import TeacherSpec
    from opd.client.recipes.evaluate import run_eval

    labels = list(students)
    report = run_eval(
        from_flags(
            EvalConfig,
            data=str(data["eval"]),
            limit=plan.eval_episodes,
            verifier="numeric",
            student=[str(students[k]) for k in labels],
            teacher=[TeacherSpec(name="teacher", urls=[url])],
            rollout_engine=engine,
            max_tokens=plan.max_new_tokens,
            seed=seed,
            out_dir=str(out),
            **_env_flags(plan),
        ),
        log=lambda _: None,
    )
    sources = [s for s in report["sources"] if s["kind"] == "student"]
    sources += [s for s in report["sources"] if s["kind"] == "teacher"]
    result = {}
    for label, source in zip([*labels, "teacher"], sources, strict=True):
        lines = (out / source["per_prompt"]).read_text().splitlines()
        graded = [json.loads(line)["turn_correct"][0] for line in lines]
        result[label] = {
            **turn_accuracy(graded, plan.turns),
            "summary": source["summary"],
            "per_prompt": f"{out.name}/{source['per_prompt']}",
        }
    return result


def _engine(config: MultiturnConfig) -> str:
    if config.rollout_engine != "auto":
        return config.rollout_engine
    if config.tiny:
        return "hf"
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def run_multiturn(config: MultiturnConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every stage in order; OUT/results.json and OUT/multiturn.md at the end."""
    from experiments.multiturn.models import layer_student, sft_teacher
    from experiments.multiturn.tables import write_tables
    from opd.client.report.build import build_report
    from opd.client.teacher.launch import LocalTeacher
    from opd.modeling.embedded import embedded_model_dir

    started = time.perf_counter()
    plan = tiny_plan() if config.tiny else full_plan()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed, engine = config.seed, _engine(config)
    data = _data(plan, out / "data")
    timing: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timing[f"{name}_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    log(f"teacher: SmolLM2-135M-Instruct + SFT on {plan.sft_steps} x {plan.sft_batch} scripted "
        "episodes")  # fmt: skip
    sft_rows = [json.loads(x) for x in data["sft"].read_text().splitlines()]
    teacher = sft_teacher(
        embedded_model_dir(), out / "models" / "teacher", sft_rows, turns=plan.turns,
        env_seed=plan.sft_env_seed, steps=plan.sft_steps, batch_size=plan.sft_batch,
        lr=plan.sft_lr, train_layers=plan.sft_train_layers, seed=seed,
        reuse=config.reuse_models, log=log,
    )  # fmt: skip
    student = layer_student(teacher, out / "models" / "student", plan.keep, config.reuse_models)
    lap("models", t0)
    results: dict[str, Any] = {
        "version": MULTITURN_VERSION, "tiny": config.tiny, "seed": seed, "engine": engine,
        "teacher_card": json.loads((teacher / "opd_multiturn_model.json").read_text()),
    }  # fmt: skip
    with ExitStack() as stack:
        t0 = time.perf_counter()
        server = LocalTeacher(
            str(teacher),
            log_path=out / "serve-teacher.log",
            env={"OPD_DTYPE": "float32", "OPD_LOG_LEVEL": "warning"},
        )
        url = server.start()
        stack.callback(server.stop)
        lap("serve", t0)
        t0 = time.perf_counter()
        log("probe before OPD: diagnostics by turn, teacher-continuation from each turn")
        results["probe_before"] = _probe(
            plan, student, url, data, engine, out / "probe-before", seed
        )
        lap("probe_before", t0)
        t0 = time.perf_counter()
        log(f"opd train --env {ENV}: {plan.opd_steps} steps, sampled objective, {engine}")
        after = _train(plan, student, url, data, engine, out / "runs" / "opd", seed)
        lap("train", t0)
        t0 = time.perf_counter()
        log("probe after OPD: the same rows and seeds")
        results["probe_after"] = _probe(plan, after, url, data, engine, out / "probe-after", seed)
        lap("probe_after", t0)
        t0 = time.perf_counter()
        log("opd eval --env: teacher, student before and after (greedy)")
        results["accuracy"] = _evaluate(
            plan, {"before": student, "after": after}, url, data, engine, out / "eval", seed
        )
        lap("eval", t0)
    results["run"] = run_metrics(out / "runs" / "opd")
    t0 = time.perf_counter()
    build_report(out / "runs" / "opd")
    lap("report", t0)
    return write_results(results, timing, plan, started, write_tables, out / "multiturn.md", log)
