"""The `opd` command line.

    opd serve [--model PATH_OR_ID] [--dtype ...] [--device ...] [--port 8000]
    opd train --student PATH --teacher-url http://HOST:8000 --prompts FILE [options]
    opd quickstart          # OPD end to end on the embedded SmolLM2, no flags
    opd score-demo          # the teacher service scoring an example
    opd bench               # scoring throughput/latency/memory/payload vs naive HF and vLLM
    opd probe --student PATH --teacher-url URL [--teacher-url URL2 ...]   # will OPD work?
    opd coldstart --student PATH --teacher-url URL --prompts FILE        # teacher SFT first
    opd select-prompts --pool FILE --teacher-url URL --out FILE          # teacher-aligned set
    opd report RUN_DIR      # PNG plots + one HTML page of a run's / probe's diagnostics

Server-side imports (torch, FastAPI) happen inside the commands that need them, so the client
install stays light.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from opd.client.recipes.select_prompts import select_prompts_command
from opd.client.report.build import report_command

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="opd: on-policy distillation with a teacher scoring service.",
)


@app.command()
def serve(
    model: Annotated[
        str | None, typer.Option(help="local folder or hub id; default: embedded SmolLM2")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="auto|float32|bfloat16|float16")] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda|cuda:N")] = None,
    host: Annotated[str | None, typer.Option(help="bind address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default 8000)")] = None,
    backend: Annotated[str | None, typer.Option(help="hf|vllm")] = None,
    max_batch_tokens: Annotated[int | None, typer.Option(help="padded tokens per pass")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="cap on the context length")] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(help="vllm: GPUs per replica")] = None,
    gpu_memory_utilization: Annotated[
        float | None, typer.Option(help="vllm: fraction of GPU memory")
    ] = None,
    enforce_eager: Annotated[
        bool | None, typer.Option("--enforce-eager/--no-enforce-eager", help="vllm: no graphs")
    ] = None,
    enable_prefix_caching: Annotated[
        bool | None,
        typer.Option("--enable-prefix-caching/--no-enable-prefix-caching", help="vllm"),
    ] = None,
) -> None:
    """Serve a teacher model over HTTP. Every OPD_* variable applies; flags override them."""
    from opd.server.serve import run_server
    from opd.server.settings import Settings

    overrides = {
        k: v
        for k, v in {
            "model": model,
            "dtype": dtype,
            "device": device,
            "host": host,
            "port": port,
            "backend": backend,
            "max_batch_tokens": max_batch_tokens,
            "max_model_len": max_model_len,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enforce_eager": enforce_eager,
            "enable_prefix_caching": enable_prefix_caching,
        }.items()
        if v is not None
    }
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_server(settings)


@app.command()
def train(
    student: Annotated[str, typer.Option(help="student model folder")],
    teacher_url: Annotated[
        list[str], typer.Option(help="teacher service URL (repeat for several replicas)")
    ],
    prompts: Annotated[str, typer.Option(help="JSONL, Parquet, HF folder, or 'shipped'")],
    prompt_field: Annotated[str, typer.Option(help="field holding the prompt text")] = "prompt",
    run_dir: Annotated[str, typer.Option(help="metrics, TensorBoard, checkpoints")] = "runs/opd",
    objective: Annotated[
        str, typer.Option(help="sampled|student-topk|teacher-topk|jsd|overlap-topk")
    ] = "student-topk",
    topk_variant: Annotated[str, typer.Option(help="released|renormalized")] = "released",
    student_top_k: Annotated[int, typer.Option(help="K candidates per position")] = 16,
    teacher_top_k: Annotated[int, typer.Option(help="teacher top-k for diagnostics")] = 16,
    discount: Annotated[float, typer.Option(help="sampled objective: discount factor")] = 0.0,
    clip_eps: Annotated[float | None, typer.Option(help="PPO ratio clip (stale rollouts)")] = None,
    ppo_epochs: Annotated[int, typer.Option(help="optimizer steps per rollout batch")] = 1,
    tail: Annotated[bool, typer.Option(help="tail bucket for teacher-topk / jsd")] = True,
    jsd_beta: Annotated[float, typer.Option(help="beta of jsd")] = 0.5,
    n_rollouts: Annotated[int, typer.Option(help="completions per prompt")] = 4,
    prompts_per_step: Annotated[int, typer.Option(help="prompts per step")] = 4,
    temperature: Annotated[float, typer.Option(help="rollout temperature")] = 1.0,
    top_p: Annotated[float, typer.Option(help="rollout top-p")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="max completion tokens")] = 256,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 1e-6,
    lr_schedule: Annotated[str, typer.Option(help="constant|cosine|linear")] = "constant",
    warmup_steps: Annotated[int, typer.Option(help="linear warmup steps")] = 0,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="gradient clipping")] = 1.0,
    micro_batch_size: Annotated[int, typer.Option(help="sequences per backward pass")] = 8,
    max_steps: Annotated[int, typer.Option(help="optimizer-step budget")] = 100,
    epochs: Annotated[int | None, typer.Option(help="stop after this many epochs")] = None,
    seed: Annotated[int, typer.Option(help="seed of data order and sampling")] = 0,
    shuffle: Annotated[bool, typer.Option(help="shuffle prompts each epoch")] = True,
    holdout: Annotated[int, typer.Option(help="last N prompts kept out of training")] = 0,
    dtype: Annotated[str, typer.Option(help="float32|bfloat16|float16")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N")] = "cpu",
    gradient_checkpointing: Annotated[bool, typer.Option(help="trade compute for memory")] = False,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = 50,
    keep_checkpoints: Annotated[int, typer.Option(help="checkpoints kept")] = 2,
    resume: Annotated[
        str | None, typer.Option(help="'latest', a checkpoint folder, or 'auto'")
    ] = None,
    depth_bucket: Annotated[int, typer.Option(help="completion tokens per depth bucket")] = 1024,
    tensorboard: Annotated[bool, typer.Option(help="also log to TensorBoard")] = True,
    allow_tokenizer_mismatch: Annotated[bool, typer.Option(help="skip the check")] = False,
) -> None:
    """On-policy distillation: the student samples, the teacher service scores, the student
    learns. The teacher API key comes from OPD_API_KEY."""
    import os

    from rich.console import Console

    from opd.client.recipes.quickstart import progress_bar
    from opd.client.train.config import TrainConfig
    from opd.client.train.trainer import Trainer, summary

    values = {k: v for k, v in locals().items() if k in TrainConfig.model_fields}
    config = TrainConfig(api_key=os.environ.get("OPD_API_KEY"), **values)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    console = Console()
    with Trainer(config) as trainer:
        console.print(
            f"{'resumed from ' + str(trainer.resume_from) if trainer.resume_from else 'fresh run'}"
            f" at step {trainer.step}; teacher {trainer.teacher_info.name}; run dir {run_dir}"
        )
        with progress_bar(console) as progress:
            task = progress.add_task("opd", total=config.max_steps, completed=trainer.step, info="")

            def on_step(step: int, metrics: dict[str, float]) -> None:
                progress.update(task, completed=step, info=summary(metrics))

            trainer.run(on_step=on_step)
    console.print(f"done: metrics in {run_dir}/metrics.jsonl, checkpoints in {run_dir}/checkpoints")


@app.command()
def quickstart() -> None:
    """The main job: OPD end to end on the embedded SmolLM2 (teacher) and a 10-layer student."""
    from opd.client.recipes.quickstart import run_quickstart

    logging.basicConfig(level=logging.WARNING)
    run_quickstart()


@app.command("score-demo")
def score_demo(
    prompt: Annotated[str, typer.Option(help="user message of the scored example")] = (
        "What is the capital of France?"
    ),
) -> None:
    """Start the embedded teacher in its own process and score an example conversation."""
    from opd.client.recipes.score_demo import run_score_demo

    run_score_demo(prompt)


@app.command()
def bench(
    model: Annotated[
        str | None, typer.Option(help="model folder; default: embedded SmolLM2")
    ] = None,
    sequences: Annotated[int, typer.Option(help="sequences per round")] = 32,
    prompt_len: Annotated[int, typer.Option(help="prompt tokens (not scored)")] = 64,
    completion_len: Annotated[int, typer.Option(help="completion tokens (scored)")] = 192,
    top_k: Annotated[int, typer.Option(help="teacher top-k")] = 16,
    candidates: Annotated[int, typer.Option(help="caller-chosen candidate ids per position")] = 16,
    seqs_per_request: Annotated[int, typer.Option(help="sequences per HTTP request")] = 4,
    rollouts_per_prompt: Annotated[
        int, typer.Option(help="sequences sharing one prompt (OPD's n rollouts); 1 = unique")
    ] = 1,
    concurrency: Annotated[list[int], typer.Option(help="concurrent clients (repeatable)")] = [  # noqa: B006
        1,
        8,
    ],
    rounds: Annotated[int, typer.Option(help="measured rounds per contender")] = 3,
    contender: Annotated[
        list[str] | None,
        typer.Option(help="inprocess|http-binary|http-json|naive|vllm|matmul|longseq; default all"),
    ] = None,
    opd_vllm: Annotated[
        bool, typer.Option(help="also the opd service on its vLLM backend")
    ] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: all cores)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda (servers, workers and limit)")] = "cpu",
    long_seq_len: Annotated[int, typer.Option(help="tokens of the long-sequence test")] = 4096,
    out_dir: Annotated[
        str, typer.Option(help="where JSON + markdown results go")
    ] = "bench-results",
) -> None:
    """Benchmark scoring: in-process, HTTP binary/JSON, naive HF, vLLM prompt_logprobs, limit."""
    from rich.console import Console
    from rich.table import Table

    from opd.bench.runner import ALL_CONTENDERS, BenchConfig, run_bench
    from opd.bench.workload import WorkloadConfig

    cfg = BenchConfig(
        model=model,
        workload=WorkloadConfig(
            sequences=sequences,
            prompt_len=prompt_len,
            completion_len=completion_len,
            top_k=top_k,
            candidates=candidates,
            seqs_per_request=seqs_per_request,
            rollouts_per_prompt=rollouts_per_prompt,
        ),
        rounds=rounds,
        concurrency=tuple(concurrency),
        contenders=tuple(contender) if contender else ALL_CONTENDERS,
        opd_vllm=opd_vllm,
        threads=threads,
        device=device,
        long_seq_len=long_seq_len,
        out_dir=out_dir,
    )
    unknown = set(cfg.contenders) - set(ALL_CONTENDERS)
    if unknown:
        raise typer.BadParameter(f"unknown contender(s) {sorted(unknown)}; one of {ALL_CONTENDERS}")
    console = Console()
    report = run_bench(cfg, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    inproc = report["contenders"].get("in-process", {}).get("tokens_per_s")
    table = Table(title=f"opd bench: {report['model']}")
    for col in ("contender", "tokens/s", "x in-proc", "p50 ms", "p99 ms", "B/token", "peak GB"):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for name, v in report["contenders"].items():
        table.add_row(
            name,
            f"{v['tokens_per_s']:.0f}",
            f"{v['tokens_per_s'] / inproc:.2f}" if inproc else "-",
            f"{v['p50_ms']:.0f}",
            f"{v['p99_ms']:.0f}",
            f"{v['bytes_per_token']:.0f}" if v["bytes_per_token"] else "-",
            f"{v['peak_rss_bytes'] / 1e9:.2f}" if v["peak_rss_bytes"] else "-",
        )
    if report["limit"]:
        lim = report["limit"]
        table.add_row("matmul-bound limit", f"{lim['tokens_per_s']:.0f}", "", "", "", "", "")
    console.print(table)
    for t in report["targets"]:
        mark = "[green]met[/green]" if t["met"] else "[red]NOT met[/red]"
        console.print(f"{t['target']}: {t['value']:.3f} (bound {t['bound']}) {mark}")
    if report["long_sequence"]:
        ls = report["long_sequence"]
        console.print(
            f"long sequence {ls['tokens']} tokens: chunked {ls['chunked_peak_bytes'] / 1e6:.0f} MB"
            f" vs full logits {ls['full_peak_bytes'] / 1e6:.0f} MB"
        )
    console.print(f"results: {report['path']}")


@app.command()
def probe(
    student: Annotated[str, typer.Option(help="student model folder")],
    teacher_url: Annotated[
        list[str],
        typer.Option(help="one teacher per flag (repeat to compare); replicas comma-separated"),
    ],
    prompts: Annotated[str, typer.Option(help="JSONL, Parquet, HF folder, or 'shipped'")] = (
        "shipped"
    ),
    prompt_field: Annotated[str, typer.Option(help="field holding the prompt text")] = "prompt",
    teacher_name: Annotated[
        list[str] | None, typer.Option(help="display name per --teacher-url, in order")
    ] = None,
    num_prompts: Annotated[int, typer.Option(help="prompts sampled from the set")] = 256,
    n_rollouts: Annotated[int, typer.Option(help="student rollouts per prompt")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="max completion tokens")] = 256,
    temperature: Annotated[float, typer.Option(help="rollout temperature")] = 1.0,
    top_p: Annotated[float, typer.Option(help="rollout top-p")] = 1.0,
    top_k: Annotated[int, typer.Option(help="k of the overlap (student and teacher)")] = 16,
    depth_bucket: Annotated[int, typer.Option(help="completion tokens per depth bucket")] = 256,
    seed: Annotated[int, typer.Option(help="prompt subset and sampling seed")] = 0,
    dtype: Annotated[str, typer.Option(help="student dtype")] = "float32",
    device: Annotated[str, typer.Option(help="student device")] = "cpu",
    out_dir: Annotated[str, typer.Option(help="where probe.json goes")] = "runs/probe",
    allow_tokenizer_mismatch: Annotated[bool, typer.Option(help="skip the check")] = False,
) -> None:
    """Pre-flight probe: student rollouts scored by each teacher; overlap, advantage, entropy
    gap, KL (overall and by depth), a verdict per teacher, and a ranking. Key: OPD_API_KEY."""
    import os

    from rich.console import Console

    from opd.client.recipes.probe import ProbeConfig, run_probe
    from opd.client.recipes.probe_view import print_probe

    console = Console()
    config = ProbeConfig(
        student=student,
        teachers=[[u.strip() for u in t.split(",") if u.strip()] for t in teacher_url],
        names=list(teacher_name or []),
        prompts=prompts,
        prompt_field=prompt_field,
        num_prompts=num_prompts,
        n_rollouts=n_rollouts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        student_top_k=top_k,
        teacher_top_k=top_k,
        depth_bucket=depth_bucket,
        seed=seed,
        dtype=dtype,
        device=device,
        api_key=os.environ.get("OPD_API_KEY"),
        out_dir=out_dir,
        allow_tokenizer_mismatch=allow_tokenizer_mismatch,
    )
    logging.basicConfig(level=logging.WARNING)
    report = run_probe(config, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    print_probe(report, console)
    console.print(f"written: {out_dir}/probe.json (plots: opd report {out_dir})")


@app.command()
def coldstart(
    student: Annotated[str, typer.Option(help="student model folder")],
    teacher_url: Annotated[list[str], typer.Option(help="teacher service URL (repeat: replicas)")],
    prompts: Annotated[str, typer.Option(help="JSONL, Parquet, HF folder, or 'shipped'")],
    prompt_field: Annotated[str, typer.Option(help="field holding the prompt text")] = "prompt",
    out_dir: Annotated[str, typer.Option(help="data set, split, student, metrics")] = (
        "runs/coldstart"
    ),
    sft_fraction: Annotated[float, typer.Option(help="share of prompts used for SFT")] = 0.5,
    seed: Annotated[int, typer.Option(help="split and sampling seed")] = 0,
    temperature: Annotated[float, typer.Option(help="teacher temperature")] = 0.7,
    top_p: Annotated[float, typer.Option(help="teacher top-p")] = 0.95,
    max_tokens: Annotated[int, typer.Option(help="teacher max new tokens")] = 1024,
    n: Annotated[int, typer.Option(help="teacher responses per prompt")] = 1,
    answer_pattern: Annotated[
        str | None, typer.Option(help="regex a kept response must contain, e.g. '\\boxed'")
    ] = None,
    min_loop_tokens: Annotated[int, typer.Option(help="repetition: loop length")] = 32,
    min_distinct_ratio: Annotated[
        float, typer.Option(help="repetition: distinct 4-gram share")
    ] = 0.35,
    dataset_format: Annotated[str, typer.Option(help="jsonl|parquet")] = "jsonl",
    epochs: Annotated[int, typer.Option(help="SFT epochs")] = 1,
    lr: Annotated[float, typer.Option(help="SFT learning rate")] = 1e-5,
    lr_schedule: Annotated[str, typer.Option(help="cosine|constant")] = "cosine",
    warmup_ratio: Annotated[float, typer.Option(help="SFT warmup share of steps")] = 0.05,
    batch_size: Annotated[int, typer.Option(help="SFT sequences per step")] = 8,
    sft_max_len: Annotated[int, typer.Option(help="longest SFT example (tokens)")] = 2048,
    opd_steps: Annotated[
        int, typer.Option(help="then OPD steps on the held-out prompts (0: print the command)")
    ] = 0,
    opd_max_new_tokens: Annotated[int, typer.Option(help="OPD rollout length")] = 256,
    opd_objective: Annotated[str, typer.Option(help="OPD objective")] = "student-topk",
    opd_lr: Annotated[float, typer.Option(help="OPD learning rate")] = 1e-6,
    dtype: Annotated[str, typer.Option(help="student dtype")] = "float32",
    device: Annotated[str, typer.Option(help="student device")] = "cpu",
) -> None:
    """Off-policy cold start: teacher responses, filtered, SFT the student on them, then OPD
    on prompts not used for SFT (split recorded). The teacher API key comes from OPD_API_KEY."""
    import os

    from rich.console import Console

    from opd.client.recipes.coldstart import ColdstartConfig, run_coldstart
    from opd.client.recipes.coldstart_filters import FilterConfig
    from opd.client.recipes.sft import SFTConfig

    console = Console()
    try:
        config = ColdstartConfig(
            student=student,
            teacher_url=teacher_url,
            prompts=prompts,
            prompt_field=prompt_field,
            sft_fraction=sft_fraction,
            seed=seed,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            n=n,
            filters=FilterConfig(
                answer_pattern=answer_pattern,
                min_loop_tokens=min_loop_tokens,
                min_distinct_ratio=min_distinct_ratio,
            ),
            sft=SFTConfig(
                epochs=epochs,
                lr=lr,
                lr_schedule=lr_schedule,
                warmup_ratio=warmup_ratio,
                batch_size=batch_size,
                max_len=sft_max_len,
                seed=seed,
            ),
            dataset_format=dataset_format,
            dtype=dtype,
            device=device,
            api_key=os.environ.get("OPD_API_KEY"),
            out_dir=out_dir,
            opd_steps=opd_steps,
            opd_options={
                "max_new_tokens": opd_max_new_tokens,
                "objective": opd_objective,
                "lr": opd_lr,
            },
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    logging.basicConfig(level=logging.WARNING)
    summary = run_coldstart(config, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    sft_info = summary["sft"]
    console.print(
        f"kept {summary['counts']['kept']}/{summary['counts']['responses']} teacher responses; "
        f"response NLL {sft_info['response_nll_before']:.3f} -> "
        f"{sft_info['response_nll_after']:.3f} after SFT; student: {summary['student_out']}"
    )
    if opd_steps:
        console.print(f"OPD: {opd_steps} steps in {summary['opd']['run_dir']}")
    else:
        console.print(f"next: {summary['opd']['command']}")
    console.print(f"written: {out_dir}/coldstart.json (plots: opd report {out_dir})")


# Commands defined beside their code (their modules import nothing heavy at import time).
app.command("report")(report_command)
app.command("select-prompts")(select_prompts_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
