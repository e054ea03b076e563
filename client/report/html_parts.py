"""The HTML pieces the report's sections share: numbers as text, tables, embedded figures.

html.py builds the page from them, outcome_view.py its outcome tables. Every dynamic string goes
through html.escape; a table's cells are HTML already (escape before).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opd.client.report.figures import Plot

__all__ = ["embed_figures", "fmt", "table"]


def fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "-" if v is None else html.escape(str(v))
    if math.isnan(v):
        return "-"
    return f"{v:.4g}"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: set[int]) -> str:
    """Cells are HTML already (escape before); columns in `numeric` are right-aligned."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def embed_figures(plots: list[Plot], section: str) -> str:
    """The plots of `section` as <figure>s: title, the PNG as a base64 data URI, caption."""
    out = []
    for p in plots:
        if p.section != section:
            continue
        data = base64.b64encode(p.path.read_bytes()).decode("ascii")
        out.append(
            f'<figure id="fig-{p.path.stem}"><h3>{html.escape(p.title)}</h3>'
            f'<img src="data:image/png;base64,{data}" alt="{html.escape(p.title)}">'
            f"<figcaption>{html.escape(p.caption)}</figcaption></figure>"
        )
    return "".join(out)
