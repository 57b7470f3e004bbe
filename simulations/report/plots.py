"""Matplotlib helpers of the report: figures become inline PNGs; bands and lines over sites."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from simulations.report.markup import esc

# Above this many sites, per-site curves become heatmaps and bands, tables list worst and best.
LINE_SITES = 12


def figure(fig: Any, alt: str) -> str:
    """A matplotlib figure as an inline PNG <img>; closes the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "round":  # rounds are whole numbers
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def band(ax: Any, rounds: Sequence[int], values: np.ndarray, label: str, color: str) -> None:
    """Median line with p10-p90 and min-max shading over sites (columns may be all NaN)."""
    cols = [i for i in range(values.shape[1]) if np.isfinite(values[:, i]).any()]
    if not cols:
        return
    xs = [rounds[i] for i in cols]
    v = values[:, cols]
    ax.fill_between(xs, np.nanmin(v, 0), np.nanmax(v, 0), color=color, alpha=0.15,
                    label=f"{label}: min-max")
    ax.fill_between(xs, np.nanpercentile(v, 10, 0), np.nanpercentile(v, 90, 0), color=color,
                    alpha=0.3, label=f"{label}: p10-p90")
    ax.plot(xs, np.nanmedian(v, 0), color=color, marker=".", label=f"{label}: median")


def site_lines(ax: Any, rounds: Sequence[int], values: np.ndarray, sites: Sequence[str]) -> None:
    """One line per site over rounds, leaving out its missing values."""
    for row, name in enumerate(sites):
        mask = np.isfinite(values[row])
        if mask.any():
            ax.plot(np.asarray(rounds)[mask], values[row][mask], marker=".", label=name)




def empty_panel(ax: Any, message: str) -> None:
    """A panel that says why it has nothing to show."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#555")
    ax.set(xticks=[], yticks=[], xlabel="")
