"""`opd bench-train`: the student side of OPD, per rollout-engine flavour, in one run.

    opd bench-train                              # the quickstart pair, every flavour
    opd bench-train --flavour hf-batched --flavour vllm --rounds 5

Three measurements, each flavour in its own worker process (opd.bench.train_worker):
1. rollouts: every flavour samples the same prompt set (n samples per prompt, temperature 1,
   stop at EOS), rounds alternating between flavours after one discarded warm-up round each;
   completion tokens / engine seconds, and the trainer's statistics pass on top;
2. OPD steps: a whole `opd train` step against one live teacher (the embedded SmolLM2 served by
   `opd serve`), alternating likewise; median step wall time and its split;
3. student math memory: peak extra RSS of the loss (forward + backward) and of the rollout
   statistics on `math_tokens` completion positions, full [N, V] logits vs chunks.

Ratios are against `hf-single`, the path before rollout engines existed (one prompt per generate
call, full-vocabulary logits). Results: a table on stdout, JSON + markdown in out_dir.
"""

from __future__ import annotations

import json
import statistics
import time
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from opd.bench.contenders import WorkerContender

Flavour = Literal[
    "hf-single",
    "hf-batched",
    "vllm",
    "hf-two-pass",
    "vllm-two-pass",
    "vllm-no-overlap",
    "vllm-no-share",
    "vllm-lora",
    "vllm-lora-merged",
]
LORA_RANK = 16  # the vllm-lora flavour's adapters (alpha 2 x rank)
# run when no --flavour is given: the engines, and today's step against the step before it
DEFAULT_FLAVOURS = ("hf-single", "hf-batched", "vllm", "vllm-two-pass")
ALL_FLAVOURS: tuple[str, ...] = typing.get_args(Flavour)
_WORKER = "opd.bench.train_worker"


def flavour_config(name: str, n: int, chunk: int) -> dict[str, Any]:
    """Engine, sequences per hf generate call, LM-head chunk, and the step's student passes
    of a flavour. The `-two-pass` flavours are the step before one-forward (a statistics pass
    for the candidates, then the loss; every rollout runs its prompt): the baseline of
    docs/benchmarks.md's step table. hf-single is also two-pass (the path it stands for)."""
    one = {"candidates": "sampler", "share_prompts": True, "overlap_forward": True}
    two = {"candidates": "trainer", "share_prompts": False, "overlap_forward": False}
    if name == "hf-single":  # one prompt's n samples per generate call, full logits
        return {"engine": "hf", "hf_max_sequences": n, "head_chunk_tokens": 0, **two}
    if name in ALL_FLAVOURS:
        engine = "vllm" if name.startswith("vllm") else "hf"
        step = two if name.endswith("-two-pass") else one
        if name.endswith("-no-overlap"):  # one forward, none of it while the teacher scores
            step = {**one, "overlap_forward": False}
        if name.endswith("-no-share"):  # one forward, every rollout runs its prompt
            step = {**one, "share_prompts": False}
        if "-lora" in name:  # a LoRA student, its adapters synced alone or merged
            sync = "merged" if name.endswith("-merged") else "adapters"
            step = {**one, "lora_rank": LORA_RANK, "lora_sync": sync}
        return {"engine": engine, "hf_max_sequences": 64, "head_chunk_tokens": chunk, **step}
    raise ValueError(f"flavour must be one of {ALL_FLAVOURS}, got {name!r}")


class BenchTrainConfig(BaseModel):
    """Every knob of `opd bench-train` (its flags are generated from these fields)."""

    model_config = ConfigDict(extra="forbid")

    student: str | None = Field(
        default=None, description="student folder; default: the quickstart's 24-layer student"
    )
    teacher: str | None = Field(
        default=None, description="teacher folder served for the step test; default: embedded"
    )
    flavours: tuple[Flavour, ...] = Field(
        default=DEFAULT_FLAVOURS,
        min_length=1,
        description=f"flavours to run (repeatable), of: {', '.join(ALL_FLAVOURS)}; default: "
        f"{', '.join(DEFAULT_FLAVOURS)}",
        json_schema_extra={"cli_name": "flavour"},
    )
    rounds: int = Field(default=3, ge=1, description="measured rounds per flavour")
    rollout_prompts: int = Field(default=16, ge=1, description="rollout test: prompts")
    rollout_n: int = Field(default=4, ge=1, description="rollout test: samples per prompt")
    rollout_tokens: int = Field(default=96, ge=1, description="rollout test: max new tokens")
    step_prompts: int = Field(default=8, ge=1, description="step test: prompts per step")
    step_n: int = Field(default=4, ge=1, description="step test: rollouts per prompt")
    step_tokens: int = Field(default=64, ge=1, description="step test: max new tokens")
    objective: str = Field(default="student-topk", description="step test: the objective")
    teacher_threads: int | None = Field(
        default=None,
        ge=1,
        description="step test: the teacher's torch threads (the quickstart gives it 1); "
        "default: the server's",
    )
    math_tokens: int = Field(default=4096, ge=1, description="memory test: completion positions")
    head_chunk_tokens: int = Field(default=512, ge=1, description="chunk of the batched flavours")
    device: str = Field(default="cpu", description="cpu or cuda (the student, its engine)")
    skip: tuple[Literal["rollouts", "steps", "memory"], ...] = Field(
        default=(), description="parts to skip (repeatable)"
    )
    peer: Literal["trl"] | None = Field(
        default=None,
        description="also run the whole loop against a peer trainer (trl: TRL's "
        "ServerDistillationTrainer) on the step test's shape: opd.bench.peer",
    )
    peer_steps: int = Field(default=24, ge=2, description="peer loop: optimizer steps")
    peer_lr: float = Field(default=1e-5, gt=0, description="peer loop: learning rate")
    peer_lora_rank: int = Field(
        default=16,
        ge=0,
        description="peer loop: also an opd LoRA student of this rank (at 10x the learning "
        "rate); 0: none",
    )
    peer_engine: Literal["vllm", "hf"] = Field(
        default="vllm", description="peer loop: opd's rollout engine (its fastest here: vllm)"
    )
    heldout_prompts: int = Field(default=8, ge=1, description="peer loop: held-out prompts")
    heldout_n: int = Field(default=4, ge=1, description="peer loop: samples per held-out prompt")
    out_dir: str = Field(default="bench-results", description="where JSON + markdown results go")


def _default_student() -> str:
    from opd.client.recipes.quickstart import STUDENT_LAYERS
    from opd.client.train.student import build_layer_subset_student
    from opd.modeling.embedded import cache_root, embedded_model_dir

    folder = cache_root() / f"students/SmolLM2-135M-Instruct-keep{STUDENT_LAYERS}"
    if not (folder / "config.json").is_file():
        build_layer_subset_student(embedded_model_dir(), folder, STUDENT_LAYERS)
    return str(folder)


def _alternate(
    workers: dict[str, WorkerContender], rounds: int, log
) -> dict[str, list[dict[str, Any]]]:
    """One discarded warm-up round each, then `rounds` rounds taking turns."""
    for name, w in workers.items():
        log(f"  warm-up {name}")
        w.round()
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in workers}
    for r in range(rounds):
        for name, w in workers.items():
            out[name].append(w.round())
            log(f"  round {r + 1}/{rounds} {name}: {json.dumps(out[name][-1])}")
    return out


def _close(workers: dict[str, WorkerContender]) -> None:
    for w in workers.values():
        w.close()


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(float(r[key]) for r in rows))


def run_bench_train(cfg: BenchTrainConfig, log=print) -> dict[str, Any]:  # noqa: ANN001
    from opd.bench.runner import _machine, _versions
    from opd.server.allocator import FIXED_INITIAL_THRESHOLDS_ENV

    student = cfg.student or _default_student()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = out_dir / f"logs-train-{stamp}"
    logs.mkdir()
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    report: dict[str, Any] = {
        "machine": _machine(),
        "versions": _versions(),
        "student": student,
        "config": cfg.model_dump(mode="json"),
    }

    def start(kind: str, base: dict[str, Any], n: int) -> dict[str, WorkerContender]:
        workers: dict[str, WorkerContender] = {}
        try:
            for name in cfg.flavours:
                c = {**base, **flavour_config(name, n, cfg.head_chunk_tokens), "device": cfg.device}
                log(f"  starting {kind} worker {name}")
                workers[name] = WorkerContender(
                    name, kind, c, logs / f"{kind}-{name}.log", env=env, module=_WORKER
                )
        except BaseException:
            _close(workers)
            raise
        return workers

    def measure(kind: str, base: dict[str, Any], n: int) -> dict[str, list[dict[str, Any]]]:
        workers = start(kind, base, n)
        try:
            return _alternate(workers, cfg.rounds, log)
        finally:
            _close(workers)

    if "rollouts" not in cfg.skip:
        log(f"rollouts: {cfg.rollout_prompts} prompts x {cfg.rollout_n}, <= {cfg.rollout_tokens}")
        base = {
            "student": student,
            "prompts": cfg.rollout_prompts,
            "n": cfg.rollout_n,
            "max_new_tokens": cfg.rollout_tokens,
        }
        rows = measure("rollout", base, cfg.rollout_n)
        report["rollouts"] = {
            name: {
                "tokens_per_s": statistics.median(r["tokens"] / r["engine_s"] for r in rs),
                "with_stats_tokens_per_s": statistics.median(
                    r["tokens"] / (r["engine_s"] + r["stats_s"]) for r in rs
                ),
                "tokens": _median(rs, "tokens"),
                "engine_s": _median(rs, "engine_s"),
                "stats_s": _median(rs, "stats_s"),
                "rounds": rs,
            }
            for name, rs in rows.items()
        }

    if "steps" not in cfg.skip:
        from opd.client.teacher.launch import LocalTeacher

        log(f"steps: {cfg.step_prompts} prompts x {cfg.step_n}, <= {cfg.step_tokens} tokens")
        threads = {"OPD_TORCH_THREADS": str(cfg.teacher_threads)} if cfg.teacher_threads else {}
        teacher = LocalTeacher(cfg.teacher, log_path=logs / "teacher.log", env=threads or None)
        teacher.start()
        try:
            base = {
                "student": student,
                "teacher_url": teacher.url,
                "prompts": cfg.step_prompts,
                "n": cfg.step_n,
                "max_new_tokens": cfg.step_tokens,
                "objective": cfg.objective,
                "micro_batch_size": 8,
            }
            rows = measure("step", base, cfg.step_n)
        finally:
            teacher.stop()
        keys = (
            "step_s",
            "engine_s",
            "stats_s",
            "score_s",
            "score_wait_s",
            "train_s",
            "sync_s",
            "tokens",
            "optimizer_bytes",
        )
        report["steps"] = {
            name: {**{k: _median(rs, k) for k in keys}, "rounds": rs} for name, rs in rows.items()
        }

    if cfg.peer is not None:
        from opd.bench.peer import run_peer
        from opd.client.teacher.launch import LocalTeacher
        from opd.modeling.embedded import embedded_model_dir

        log(f"peer loop against {cfg.peer}: {cfg.peer_steps} steps")
        threads = {"OPD_TORCH_THREADS": str(cfg.teacher_threads)} if cfg.teacher_threads else {}
        teacher = LocalTeacher(cfg.teacher, log_path=logs / "peer-teacher.log", env=threads or None)
        teacher.start()
        try:
            teacher_dir = cfg.teacher or str(embedded_model_dir())
            report["peer"] = run_peer(cfg, student, teacher.url, teacher_dir, logs, log)
        finally:
            teacher.stop()

    if "memory" not in cfg.skip:
        log(f"memory: student math on {cfg.math_tokens} completion positions")
        math_cfg = {
            "device": cfg.device,
            "student": student,
            "tokens": cfg.math_tokens,
            "head_chunk_tokens": cfg.head_chunk_tokens,
        }
        # RSS peaks need glibc's fixed thresholds (see opd bench's longseq worker).
        worker = WorkerContender(
            "math", "math", math_cfg, logs / "math.log", FIXED_INITIAL_THRESHOLDS_ENV, _WORKER
        )
        try:
            report["memory"] = {**(worker.setup or {}), **worker.round()}
        finally:
            worker.close()

    report["ratios"] = ratios(report)
    if "peer" in report:
        from opd.bench.peer import peer_ratios

        report["ratios"].update(peer_ratios(report["peer"]))
    path = out_dir / f"bench-train-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    (out_dir / f"bench-train-{stamp}.md").write_text(markdown_table(report))
    report["path"] = str(path)
    return report


def ratios(report: dict[str, Any]) -> dict[str, float]:
    """Each flavour against hf-single (speed: higher is better; memory: chunked / full)."""
    out: dict[str, float] = {}
    roll = report.get("rollouts", {})
    base = roll.get("hf-single")
    for name, v in roll.items():
        if base and name != "hf-single":
            out[f"rollout tokens/s {name} / hf-single"] = v["tokens_per_s"] / base["tokens_per_s"]
            out[f"rollout+stats tokens/s {name} / hf-single"] = (
                v["with_stats_tokens_per_s"] / base["with_stats_tokens_per_s"]
            )
    steps = report.get("steps", {})
    for name, v in steps.items():
        # each one-pass flavour against its engine's two-pass step, and all against hf-single
        engine = name.split("-")[0]
        baselines = [f"{engine}-two-pass", "hf-single"]
        for base_name in baselines:
            base = steps.get(base_name)
            if base is None or base_name == name:
                continue
            # step time per completion token: steps sample different lengths
            mine = v["step_s"] / max(v["tokens"], 1)
            theirs = base["step_s"] / max(base["tokens"], 1)
            out[f"step speed-up per token {name} vs {base_name}"] = theirs / mine
            out[f"step speed-up {name} vs {base_name}"] = base["step_s"] / v["step_s"]
    mem = report.get("memory")
    if mem:
        out["loss peak memory chunked / full"] = (
            mem["loss_chunked_peak_bytes"] / mem["loss_full_peak_bytes"]
        )
        out["stats peak memory chunked / full"] = (
            mem["stats_chunked_peak_bytes"] / mem["stats_full_peak_bytes"]
        )
    return out


def markdown_table(report: dict[str, Any]) -> str:
    lines = []
    if report.get("rollouts"):
        lines += [
            "| flavour | rollout tok/s | + statistics tok/s | engine s | statistics s |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, v in report["rollouts"].items():
            lines.append(
                f"| {name} | {v['tokens_per_s']:.1f} | {v['with_stats_tokens_per_s']:.1f} | "
                f"{v['engine_s']:.1f} | {v['stats_s']:.1f} |"
            )
        lines.append("")
    if report.get("steps"):
        lines += [
            "| flavour | step s | engine s | statistics s | teacher s | teacher wait s | "
            "update s | sync s | tokens | optimizer MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        nan = float("nan")
        for name, v in report["steps"].items():
            lines.append(
                f"| {name} | {v['step_s']:.2f} | {v['engine_s']:.2f} | {v['stats_s']:.2f} | "
                f"{v.get('score_s', nan):.2f} | {v['score_wait_s']:.2f} | "
                f"{v['train_s']:.2f} | {v['sync_s']:.2f} | {v['tokens']:.0f} | "
                f"{v.get('optimizer_bytes', nan) / 1e6:.1f} |"
            )
        lines.append("")
    if report.get("memory"):
        m = report["memory"]
        lines += [
            f"Student math on {m['tokens']} positions, vocabulary {m['vocab']} (peak extra RSS):",
            "",
            f"| part | full logits MB | chunks of {m['chunk_tokens']} MB |",
            "|---|---:|---:|",
            f"| loss (fwd + bwd) | {m['loss_full_peak_bytes'] / 1e6:.0f} | "
            f"{m['loss_chunked_peak_bytes'] / 1e6:.0f} |",
            f"| rollout statistics | {m['stats_full_peak_bytes'] / 1e6:.0f} | "
            f"{m['stats_chunked_peak_bytes'] / 1e6:.0f} |",
            "",
        ]
    if report.get("peer"):
        from opd.bench.peer import peer_table

        lines += peer_table(report["peer"])
    for name, value in report.get("ratios", {}).items():
        lines.append(f"- {name}: {value:.2f}")
    return "\n".join(lines) + "\n"
