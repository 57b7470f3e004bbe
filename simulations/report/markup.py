"""HTML building blocks of the report: escaping, number formats, tables, sections."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any


def esc(value: Any) -> str:
    """Text for HTML, quotes included."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table cell; '–' for missing values."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value and abs(value) < 10 ** -digits:
            return f"{value:.{digits - 1}g}"
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:,.0f}"
    return esc(value)


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"  # pragma: no cover - the loop returns at GiB


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, cls: str = "") -> str:
    """An HTML table; cells already formatted as strings are escaped unless they are markup."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    thead = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    body = "".join(
        "<tr>" + "".join(f"<td>{c if isinstance(c, Markup) else _cell(c)}</td>" for c in row)
        + "</tr>"
        for row in rows
    )
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}>{thead}<tbody>{body}</tbody></table>"


class Markup(str):
    """A string that is already HTML."""


def _cell(value: Any) -> str:
    return esc(value) if isinstance(value, str) else fmt(value)


def section(anchor: str, title: str, body: str) -> str:
    """A report section with its anchor and heading."""
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{body}\n</section>'
