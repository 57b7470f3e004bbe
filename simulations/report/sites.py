"""The report's per-site sections: metrics per site per round, and participation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from simulations.report.data import (
    ABSENT,
    FAILED,
    REFUSED,
    SCREENED,
    TRAINED,
    bytes_by_site,
    epsilon_matrix,
    last_finite,
    order_by_last,
    participation_matrix,
    site_metric,
)
from simulations.report.markup import esc, human_bytes, section, table
from simulations.report.plots import LINE_SITES, band, empty_panel, figure, pyplot, site_lines

TABLE_SITES = 40
# The participation grid is an HTML table up to this size, an image beyond.
GRID_SITES, GRID_ROUNDS = 40, 60


PARTICIPATION = {
    ABSENT: ("not sampled / no reply", "#e8e8e8"),
    TRAINED: ("update aggregated", "#2e9e44"),
    FAILED: ("failed (error, timeout)", "#d62728"),
    REFUSED: ("refused (privacy budget)", "#ff9f1c"),
    SCREENED: ("screened out", "#8e44ad"),
}


def per_site_section(results: dict[str, Any], sites: Sequence[str]) -> str:
    """Each site's metrics over rounds: lines, or heatmaps and bands for many sites."""
    plt = pyplot()
    rounds = [r["round"] for r in results["rounds"]]
    auc = site_metric(results, sites, "evaluate", "auc")
    loss = site_metric(results, sites, "train", "train-loss")
    many = len(sites) > LINE_SITES
    fig, (ax_a, ax_l) = plt.subplots(1, 2, figsize=(12, 3.8), constrained_layout=True)
    if many and not np.isfinite(auc).any():
        ax_a.set(title="Validation AUC per site")
        empty_panel(ax_a, "no site reported a validation AUC")
    if many:
        band(ax_l, rounds, loss, "train loss", "tab:blue")
        ax_l.set(title="Local training loss across sites", xlabel="round")
        if ax_l.lines:
            ax_l.legend(fontsize="small")
    if many and np.isfinite(auc).any():
        order = order_by_last(auc)
        im = ax_a.imshow(auc[order], aspect="auto", cmap="viridis", vmin=0, vmax=1,
                         interpolation="nearest",
                         extent=(rounds[0] - 0.5, rounds[-1] + 0.5, len(sites), 0))
        fig.colorbar(im, ax=ax_a, label="validation AUC")
        ax_a.set(title=f"Validation AUC, {len(sites):,} sites (sorted by last AUC; blank: none)",
                 xlabel="round", ylabel="site rank")
    elif not many:
        site_lines(ax_a, rounds, auc, sites)
        ax_a.set(title="Global model's AUC on each site's validation images", xlabel="round",
                 ylim=(0, 1.02))
        if not ax_a.lines:
            empty_panel(ax_a, "no site reported a validation AUC")
        site_lines(ax_l, rounds, loss, sites)
        ax_l.set(title="Local training loss per site", xlabel="round")
        for ax in (ax_a, ax_l):
            if ax.lines:
                ax.legend(fontsize="small", loc="best")
    img = figure(fig, "per-site metrics per round")
    grid = participation_matrix(results, sites)
    eps = epsilon_matrix(results, sites)
    traffic = bytes_by_site(results)
    failures = Counter(
        f["site"] for r in results["rounds"] for f in r.get("failures") or []
    )
    rows: list[list[Any]] = []
    for i, name in enumerate(sites):
        last = last_finite(auc[i])
        mean = float(np.nanmean(auc[i])) if np.isfinite(auc[i]).any() else None
        t = traffic.get(name, {})
        rows.append([
            name, int((grid[i] == TRAINED).sum()), last, mean, last_finite(loss[i]),
            last_finite(eps[i]), failures.get(name, 0),
            human_bytes(t.get("down", 0)), human_bytes(t.get("up", 0)),
        ])
    header = ["site", "rounds trained", "last val AUC", "mean val AUC", "last train loss",
              "epsilon", "failures", "bytes down", "bytes up"]
    if len(rows) > TABLE_SITES:
        # worst first: lowest validation AUC, or, without any, highest training loss
        col, sign, what = (2, 1.0, "lowest last validation AUC") if np.isfinite(auc).any() \
            else (4, -1.0, "highest last training loss")
        known = sorted((r for r in rows if r[col] is not None), key=lambda r: sign * r[col])
        k = 10
        body = (
            f"<h3>The {k} sites with the {what}</h3>" + table(header, known[:k])
            + f"<h3>The {k} sites at the other end</h3>" + table(header, known[-k:][::-1])
            + f"<details><summary>all {len(rows):,} sites</summary><div class=scroll>"
            + table(header, rows) + "</div></details>"
        )
    else:
        body = table(header, rows)
    return section("sites", "Per-site metrics per round", img + body)


def participation_section(results: dict[str, Any], sites: Sequence[str]) -> str:
    """What each site did in each round: a grid, or an image for large runs."""
    rounds = [r["round"] for r in results["rounds"]]
    grid = participation_matrix(results, sites)
    legend = "".join(
        f'<span class=key><i style="background:{color}"></i>{esc(label)}</span>'
        for label, color in PARTICIPATION.values()
    )
    counts = [
        [r, int((grid[:, c] == TRAINED).sum()), int((grid[:, c] == FAILED).sum()),
         int((grid[:, c] == REFUSED).sum()), int((grid[:, c] == SCREENED).sum()),
         results["rounds"][c].get("sites_connected")]
        for c, r in enumerate(rounds)
    ]
    if len(sites) <= GRID_SITES and len(rounds) <= GRID_ROUNDS:
        head = "".join(f"<th>{r}</th>" for r in rounds)
        body = "".join(
            f"<tr><th class=site>{esc(name)}</th>" + "".join(
                f'<td class=cell style="background:{PARTICIPATION[int(code)][1]}" '
                f'title="{esc(name)}, round {r}: {PARTICIPATION[int(code)][0]}"></td>'
                for r, code in zip(rounds, grid[i], strict=True)
            ) + "</tr>"
            for i, name in enumerate(sites)
        )
        picture = f"<div class=scroll><table class=grid><tr><th>site \\ round</th>{head}</tr>" \
                  f"{body}</table></div>"
    else:
        picture = _participation_image(grid, rounds, len(sites))
    summary = table(
        ["round", "trained", "failed", "refused", "screened", "sites connected"], counts
    )
    return section(
        "participation", "Participation",
        f"<p>Which sites' training updates reached the aggregator, per round.</p>"
        f"<p>{legend}</p>{picture}<details><summary>counts per round</summary>"
        f"<div class=scroll>{summary}</div></details>",
    )


def _participation_image(grid: np.ndarray, rounds: Sequence[int], n_sites: int) -> str:
    plt = pyplot()
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap([color for _, color in PARTICIPATION.values()])
    fig, (ax, ax_n) = plt.subplots(
        2, 1, figsize=(12, 6), height_ratios=(3, 1), sharex=True, constrained_layout=True
    )
    ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=len(PARTICIPATION) - 1,
              interpolation="nearest",
              extent=(rounds[0] - 0.5, rounds[-1] + 0.5, n_sites, 0))
    ax.set(title=f"Participation of {n_sites:,} sites (rows, in name order)", ylabel="site")
    ax_n.plot(rounds, (grid == TRAINED).sum(0), color=PARTICIPATION[TRAINED][1], label="trained")
    for code in (FAILED, REFUSED, SCREENED):
        ax_n.plot(rounds, (grid == code).sum(0), color=PARTICIPATION[code][1],
                  label=PARTICIPATION[code][0])
    ax_n.set(xlabel="round", ylabel="sites")
    ax_n.legend(fontsize="small", ncol=4)
    return figure(fig, "participation heatmap")
