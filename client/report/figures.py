"""The figure primitives of `opd report`: the Plot a figure becomes, the panels of a series
figure, matplotlib figures on the Agg backend, and the report's colours.

Figures are built with the object API (matplotlib.figure.Figure on a FigureCanvasAgg), not
pyplot: no global state, no display, safe to call from any thread. matplotlib and numpy are
imported inside the functions. plots.py, teacher_view.py and outcome_view.py draw with these.

Series figures shade the early and late windows that the health checks compare; with more than
SMOOTH_ABOVE steps the raw values are drawn faint under a rolling mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opd.client.report.health import window_slices

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from opd.client.report.inputs import Series

# Above this many steps, raw values are drawn faint and a rolling mean over ~1/25 of the run on
# top: below it every step is visible on its own.
SMOOTH_ABOVE = 30
DPI = 100

# The verdict and filter colours (green: good, orange: borderline, red: bad, grey: none).
GREEN, ORANGE, RED, GREY = "#27ae60", "#e67e22", "#c0392b", "#9aa5b1"


@dataclass(frozen=True)
class Plot:
    section: str  # "steps" | "depth" | "turn" | "teachers" | "probe" | "coldstart" | "outcome"
    path: Path
    title: str
    caption: str


@dataclass(frozen=True)
class Panel:
    """One axes of a series figure: lines for `keys` ((key, legend label) pairs) over steps."""

    title: str
    keys: Sequence[tuple[str, str]]
    zero_line: bool = False
    log_y: bool = False
    band: dict[str, str] = field(default_factory=dict)  # key -> key of its +-1 std band


def figure(nrows: int, ncols: int, width: float, height: float) -> tuple[Figure, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def save(fig: Figure, out_dir: Path, name: str, section: str, title: str, caption: str) -> Plot:
    path = out_dir / f"{name}.png"
    fig.savefig(path, format="png", metadata={"Software": None})
    return Plot(section, path, title, caption)


def grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def hide_unused(axes: Any, used: int) -> None:
    for ax in axes.flat[used:]:
        ax.set_visible(False)


def panel_grid(
    n: int, size: Callable[[int, int], tuple[float, float]], max_cols: int = 3
) -> tuple[Figure, list[Axes]]:
    """A figure of n panels in rows of at most max_cols, sized by size(rows, cols) -> (width,
    height) in inches, the cells past n hidden; its n axes in reading order."""
    rows, cols = grid(n, max_cols)
    fig, axes = figure(rows, cols, *size(rows, cols))
    hide_unused(axes, n)
    return fig, list(axes.flat[:n])


def _rolling_mean(y: np.ndarray, w: int) -> np.ndarray:
    """Centred mean over w steps, ignoring nan (nan where the whole window is nan)."""
    import numpy as np

    ok = np.isfinite(y)
    kernel = np.ones(w)
    sums = np.convolve(np.where(ok, y, 0.0), kernel, mode="same")
    counts = np.convolve(ok.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def _draw_series(ax: Axes, series: Series, panel: Panel, frac: float) -> bool:
    """Draw one panel; False when none of its keys has data."""
    import numpy as np

    x = series.steps_S
    drawn = False
    smooth = len(series) > SMOOTH_ABOVE
    for i, (key, label) in enumerate(panel.keys):
        y = series.get(key)
        if y is None:
            continue
        drawn = True
        color = f"C{i}"
        if smooth:
            ax.plot(x, y, color=color, alpha=0.3, linewidth=0.8)
            w = max(2, len(series) // 25)
            ax.plot(x, _rolling_mean(y, w), color=color, label=f"{label} (mean of {w})")
        else:
            ax.plot(x, y, color=color, marker="o", markersize=3, label=label)
        std = series.get(panel.band.get(key, ""))
        if std is not None:
            ax.fill_between(x, y - std, y + std, color=color, alpha=0.15, linewidth=0)
    if not drawn:
        return False
    if len(series) >= 2:
        a, b = window_slices(len(series), frac)
        for s in (a, b):
            ax.axvspan(x[s][0] - 0.5, x[s][-1] + 0.5, color="0.85", zorder=0, linewidth=0)
    if panel.zero_line:
        ax.axhline(0.0, color="0.4", linewidth=0.8, linestyle="--")
    if panel.log_y and all(
        np.nanmin(series.get(k)) > 0 for k, _ in panel.keys if series.get(k) is not None
    ):
        ax.set_yscale("log")
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return True


def series_figure(
    series: Series,
    out_dir: Path,
    frac: float,
    name: str,
    title: str,
    caption: str,
    panels: Sequence[Panel],
    section: str = "steps",
) -> list[Plot]:
    present = [p for p in panels if any(series.get(k) is not None for k, _ in p.keys)]
    if not present:
        return []
    fig, axes = panel_grid(
        len(present), lambda rows, cols: (4.2 * cols if cols > 1 else 7.5, 3.0 * rows)
    )
    for ax, panel in zip(axes, present, strict=True):
        _draw_series(ax, series, panel, frac)
    return [save(fig, out_dir, name, section, title, caption)]
