"""The live progress line fits an 80-column terminal, worst case included (rich would cut it
with an ellipsis, as it once cut 'teacher wait' to 'teache…')."""

from __future__ import annotations

import io
import re

from rich.console import Console

from opd.client.train.progress import WIDTH, progress_bar, step_line

WORST = {
    "train/loss": -12.3456,
    "kl/sampled": 12.345,
    "overlap/ratio": 0.123,
    "time/generate_s": 123.4,
    "time/score_wait_s": 99.9,
}


def test_the_progress_line_fits_80_columns_without_cutting():
    out = io.StringIO()
    console = Console(file=out, width=WIDTH, force_terminal=True, color_system=None)
    with progress_bar(console) as progress:
        task = progress.add_task("opd", total=100_000, info="")
        progress.update(task, completed=100_000, info=step_line(WORST))
        progress.refresh()
    lines = [line for line in out.getvalue().replace("\r", "\n").splitlines() if "OPD" in line]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", lines[-1]).strip()  # cursor controls
    assert "…" not in text and len(text) <= WIDTH, text
    for part in ("100000/100000", "loss -12.346", "kl 12.35", "overlap 0.12", "wait 100s"):
        assert part in text, (part, text)


def test_the_line_leaves_out_diagnostics_that_were_off():
    lean = {k: v for k, v in WORST.items() if k != "overlap/ratio"}
    assert "overlap" not in step_line(lean)
