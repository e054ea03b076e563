"""The live progress line of a training run (`opd train`, `opd quickstart`): one line that fits
an 80-column terminal, worst case included (step 100000/100000, 2-digit loss and KL).

It shows what tells a user the run is healthy at a glance: the loss, the sampled reverse KL
and the top-k overlap (both should move toward the teacher), and where the time goes
(sampling vs waiting for the teacher). Everything else is in metrics.jsonl and the report.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress, TextColumn, TimeElapsedColumn

WIDTH = 80


def step_line(metrics: dict[str, float]) -> str:
    """The step's live numbers, compact (diagnostics that were off are left out)."""
    parts = [f"loss {metrics['train/loss']:+.3f}", f"kl {metrics['kl/sampled']:.2f}"]
    if "overlap/ratio" in metrics:
        parts.append(f"overlap {metrics['overlap/ratio']:.2f}")
    parts.append(f"gen {_seconds(metrics['time/generate_s'])}")
    parts.append(f"wait {_seconds(metrics['time/score_wait_s'])}")
    return " ".join(parts)


def _seconds(value: float) -> str:
    """Tenths below 10 s (where they matter), whole seconds above (where they do not)."""
    return f"{value:.1f}s" if value < 10 else f"{value:.0f}s"


def progress_bar(console: Console) -> Progress:
    """The OPD progress line: step count, the live numbers, elapsed time (no bar: the step
    count says as much in fewer columns)."""
    return Progress(
        TextColumn("[bold]OPD[/] {task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    )
