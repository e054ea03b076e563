"""`opd bench-train --peer trl`: the whole OPD loop against its peer's, side by side in one run.

Contenders, each in its own process, one after the other, against ONE `opd serve` teacher:
- `opd sampled`: `opd train --objective sampled` (the per-token reverse KL the peer's server
  trainer also estimates), on its fastest rollout path here (the in-process vLLM engine);
- `opd sampled, no diagnostics`: the same, the teacher asked only for what the peer asks for
  (the sampled tokens' log-probs; the default run also asks for top-16, candidates, entropy);
- `opd student-topk`: the same budget with the paper's default objective, which the peer's
  server trainer cannot run (it "cannot score arbitrary student-selected tokens");
- `opd sampled lora-R`: a LoRA student of rank R (`--peer-lora-rank`) at 10x the learning
  rate, its adapters merged into the engine's weights each step (`--lora-sync merged`: on CPU
  vLLM's LoRA kernels make sampling about 3x slower, docs/training.md);
- `trl`: TRL's `ServerDistillationTrainer`, as installed (opd.bench.peer_trl says exactly
  how it is configured and why its rollouts use transformers' generate on CPU).

Every contender trains the same student on the same prompts, in the same order, with the same
rollouts per prompt, completion budget, learning rate, steps and gradient clipping. Then one
independent script (opd.bench.heldout_kl) samples every final student on held-out prompts with
the same seeds and reports the sampled reverse KL against the same teacher: the quality
column, computed the same way for all. The student before training is measured too.

Per contender: the median step wall time and its split (sampling, teacher, update), trained
completion tokens per second, peak RSS of its process (os.wait4), and the fraction of the
step's matmul-bound time it reaches: the FLOPs of sampling, the student's forward and backward
(3x a forward) and the teacher's forward on the step's tokens, counted as `opd bench` counts
them (opd.bench.workload.forward_flops: each prompt once, the head on the scored rows), divided
by this machine's float32 matmul rate measured in the same run (opd.bench.worker.matmul_rate).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

OPD_OBJECTIVES = ("sampled", "student-topk")


def _wait(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[str, int]:
    """Run `cmd` to the end; (its stdout, its peak RSS in bytes) from the kernel's own
    accounting of that child (wait4's ru_maxrss, KiB on Linux)."""
    with log.open("w") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, env={**os.environ, **env}, text=True
        )
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}; see {log}")
    return out, int(usage.ru_maxrss) * 1024


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def run_opd(
    objective: str, student: str, teacher_url: str, prompts_file: Path, shape: dict[str, Any],
    run_dir: Path, log: Path,
) -> dict[str, Any]:  # fmt: skip
    """One `opd train` run; per-step times from its metrics.jsonl."""
    from opd.client.train.metric_log import read_metrics

    cmd = [
        sys.executable, "-m", "opd.client.cli", "train",
        "--student", student, "--teacher-url", teacher_url,
        "--prompts", str(prompts_file), "--no-shuffle",
        "--objective", objective, "--rollout-engine", shape["engine"],
        "--max-steps", str(shape["steps"]), "--prompts-per-step", str(shape["prompts_per_step"]),
        "--n-rollouts", str(shape["n"]), "--max-new-tokens", str(shape["max_new_tokens"]),
        "--lr", str(shape["lr"]), "--warmup-steps", "0", "--seed", str(shape["seed"]),
        "--checkpoint-every", str(shape["steps"]), "--keep-checkpoints", "1",
        "--logger", "jsonl", "--run-dir", str(run_dir),
    ]  # fmt: skip
    shared = len(cmd)  # the flags after these tell the contenders apart
    if shape.get("lora_rank"):
        rank = str(shape["lora_rank"])
        cmd += ["--lora-rank", rank, "--lora-alpha", str(2 * int(rank))]
        cmd += ["--lora-sync", shape.get("lora_sync", "adapters")]
    if shape.get("diagnostics") is False:
        cmd.append("--no-diagnostics")
    _, peak = _wait(cmd, log, {"VLLM_CPU_KVCACHE_SPACE": "1"})
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [
        {
            "step_s": float(m["time/step_s"]),
            "generate_s": float(m["time/engine_s"]),
            "teacher_s": float(m["time/score_s"]),
            "teacher_wait_s": float(m["time/score_wait_s"]),
            "train_s": float(m["time/train_s"]),
            "sync_s": float(m["time/sync_s"]),
            "tokens": int(m["rollout/completion_tokens"]),
        }
        for m in rows
    ]
    return {
        "runner": " ".join(["opd train --objective", objective, *cmd[shared:]]),
        "rollout_path": f"opd {shape['engine']} engine",
        "steps": steps,
        "peak_rss_bytes": peak,
        "saved": str(run_dir / "checkpoints" / f"step_{shape['steps']}" / "model"),
    }


def run_trl(
    student: str, teacher_url: str, prompts: list[str], shape: dict[str, Any], out: Path,
    log: Path,
) -> dict[str, Any]:  # fmt: skip
    cfg = {
        "student": student,
        "teacher_url": teacher_url,
        "prompts": prompts,
        "n": shape["n"],
        "prompts_per_step": shape["prompts_per_step"],
        "max_new_tokens": shape["max_new_tokens"],
        "lr": shape["lr"],
        "steps": shape["steps"],
        "seed": shape["seed"],
        "out_dir": str(out),
        "temperature": 1.0,
    }
    stdout, peak = _wait([sys.executable, "-m", "opd.bench.peer_trl", json.dumps(cfg)], log, {})
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_bytes"] = peak  # the same accounting as opd's runs
    return result


def step_flops(
    student_config: Any, teacher_config: Any, prompt_len: float, tokens: float, sequences: int,
    prompts: int,
) -> dict[str, float]:  # fmt: skip
    """The least FLOPs of one step's matmuls: sampling (a forward over every completion, the
    head on its rows), the student's update (forward + backward = 3 forwards) and the
    teacher's scoring forward; each prompt through each decoder once (its rollouts share it)."""
    from opd.bench.workload import forward_flops

    p = max(1, round(prompt_len))
    c = max(1, round(tokens / max(sequences, 1)))

    def forward(config: Any) -> float:
        prompt_part = forward_flops(config, p, 0)
        completion = forward_flops(config, p + c, c) - prompt_part
        return prompts * prompt_part + sequences * completion

    student = forward(student_config)
    return {
        "sampling": student,
        "update": 3 * student,
        "teacher": forward(teacher_config),
    }


def summarize(
    result: dict[str, Any], flops: dict[str, float], rate: float, heldout: dict[str, Any]
) -> dict[str, Any]:
    """Medians over the steps after the first (its warm-up: lazy allocations, compilation)."""
    steps = result["steps"][1:] or result["steps"]
    step_s = _median([s["step_s"] for s in steps])
    tokens = _median([s["tokens"] for s in steps])
    limit_s = sum(flops.values()) / rate
    return {
        "step_s": step_s,
        "generate_s": _median([s["generate_s"] for s in steps]),
        "teacher_s": _median([s["teacher_s"] for s in steps]),
        "train_s": _median([s["train_s"] for s in steps]),
        "tokens_per_step": tokens,
        "tokens_per_s": _median([s["tokens"] / s["step_s"] for s in steps]),
        "peak_rss_bytes": result["peak_rss_bytes"],
        "matmul_bound_s": limit_s,
        "limit_fraction": limit_s / step_s,
        "heldout_kl": heldout["kl_sampled"],
        "rollout_path": result.get("rollout_path"),
    }


def run_peer(
    cfg: Any, student: str, teacher_url: str, teacher_dir: str, logs: Path, log: Any
) -> dict[str, Any]:
    """Every contender on one teacher, then the held-out KL of every final student."""
    from transformers import AutoConfig, AutoTokenizer

    from opd.bench.heldout_kl import heldout_kl
    from opd.bench.worker import matmul_rate
    from opd.client.recipes.quickstart import quickstart_engine
    from opd.client.train.prompts import load_prompts
    from opd.shared.chat import chat_prompt_ids

    texts = load_prompts("shipped", "prompt")
    budget = cfg.step_prompts * cfg.peer_steps
    if budget + cfg.heldout_prompts > len(texts):
        raise ValueError(
            f"peer_steps: {budget} training + {cfg.heldout_prompts} held-out prompts exceed "
            f"the {len(texts)} shipped prompts"
        )
    train, held = texts[:budget], texts[-cfg.heldout_prompts :]
    prompts_file = logs / "peer-prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in train))
    shape = {
        "steps": cfg.peer_steps,
        "prompts_per_step": cfg.step_prompts,
        "n": cfg.step_n,
        "max_new_tokens": cfg.step_tokens,
        "lr": cfg.peer_lr,
        "seed": 0,
        "engine": cfg.peer_engine if quickstart_engine() == "vllm" else "hf",
    }
    runs: list[tuple[str, str, dict[str, Any]]] = [
        (f"opd {objective}", objective, shape) for objective in OPD_OBJECTIVES
    ]
    # the teacher asked for what TRL asks for: the sampled tokens' log-probs only
    runs.append(("opd sampled, no diagnostics", "sampled", {**shape, "diagnostics": False}))
    if cfg.peer_lora_rank:  # adapters learn at a higher rate than full weights: 10x
        rank = cfg.peer_lora_rank
        lora = {**shape, "lr": 10 * shape["lr"], "lora_rank": rank, "lora_sync": "merged"}
        runs.append((f"opd sampled lora-{rank}", "sampled", lora))
    results: dict[str, dict[str, Any]] = {}
    for name, objective, run_shape in runs:
        log(f"peer loop: {name}, {cfg.peer_steps} steps")
        slug = name.replace(",", "").replace(" ", "-")
        results[name] = run_opd(
            objective, student, teacher_url, prompts_file, run_shape,
            logs / f"peer-{slug}", logs / f"peer-{slug}.log",
        )  # fmt: skip
    log(f"peer loop: trl, {cfg.peer_steps} steps")
    results["trl"] = run_trl(
        student, teacher_url, train, shape, logs / "peer-trl-student", logs / "peer-trl.log"
    )
    rate = matmul_rate()
    kl_cfg = {
        "teacher_url": teacher_url,
        "prompts": held,
        "n": cfg.heldout_n,
        "max_new_tokens": cfg.step_tokens,
        "seed": 1234,
    }
    log("held-out KL: the student before training and every final student")
    before = heldout_kl({**kl_cfg, "student": student})
    tokenizer = AutoTokenizer.from_pretrained(student)
    prompt_len = statistics.mean(len(chat_prompt_ids(tokenizer, t)) for t in train)
    student_config = AutoConfig.from_pretrained(student)
    teacher_config = AutoConfig.from_pretrained(teacher_dir)
    table: dict[str, Any] = {}
    for name, result in results.items():
        heldout = heldout_kl({**kl_cfg, "student": result["saved"]})
        tokens = _median([s["tokens"] for s in result["steps"][1:] or result["steps"]])
        flops = step_flops(
            student_config, teacher_config, prompt_len, tokens,
            cfg.step_prompts * cfg.step_n, cfg.step_prompts,
        )  # fmt: skip
        table[name] = summarize(result, flops, rate, heldout)
    return {
        "shape": shape,
        "matmul_flops_per_s": rate,
        "mean_prompt_tokens": prompt_len,
        "heldout_kl_before": before["kl_sampled"],
        "heldout": {"prompts": len(held), "n": cfg.heldout_n, "seed": kl_cfg["seed"]},
        "table": table,
        "runs": results,
    }


def peer_ratios(peer: dict[str, Any]) -> dict[str, float]:
    """opd against the peer: trained tokens/s and held-out KL (lower is better)."""
    table = peer["table"]
    trl = table.get("trl")
    out: dict[str, float] = {}
    if trl is None:
        return out
    for name, row in table.items():
        if name == "trl":
            continue
        out[f"trained tokens/s {name} / trl"] = row["tokens_per_s"] / trl["tokens_per_s"]
        out[f"step time trl / {name}"] = trl["step_s"] / row["step_s"]
        out[f"held-out KL {name} - trl (nats/token)"] = row["heldout_kl"] - trl["heldout_kl"]
    return out


def peer_table(peer: dict[str, Any]) -> list[str]:
    lines = [
        f"The loop against its peer: {peer['shape']['steps']} steps of "
        f"{peer['shape']['prompts_per_step']} prompts x {peer['shape']['n']}, <= "
        f"{peer['shape']['max_new_tokens']} tokens, lr {peer['shape']['lr']}; held-out KL on "
        f"{peer['heldout']['prompts']} prompts x {peer['heldout']['n']} (before training: "
        f"{peer['heldout_kl_before']:.3f}); matmul {peer['matmul_flops_per_s'] / 1e9:.0f} "
        "GFLOP/s",
        "",
        "| trainer | rollouts | step s | sampling s | teacher s | update s | trained tok/s | "
        "held-out KL | peak RSS GB | matmul-bound s | fraction |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in peer["table"].items():
        lines.append(
            f"| {name} | {r['rollout_path']} | {r['step_s']:.2f} | {r['generate_s']:.2f} | "
            f"{r['teacher_s']:.2f} | {r['train_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['heldout_kl']:.3f} | {r['peak_rss_bytes'] / 1e9:.2f} | "
            f"{r['matmul_bound_s']:.2f} | {r['limit_fraction']:.2f} |"
        )
    return [*lines, ""]
