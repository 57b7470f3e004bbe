"""The report's bytes section: model traffic per site."""

from __future__ import annotations

from typing import Any

import numpy as np

from simulations.report.data import bytes_by_site, model_float32_bytes
from simulations.report.markup import human_bytes, section, table
from simulations.report.plots import figure, pyplot


def bytes_section(results: dict[str, Any]) -> str:
    """Model bytes sent to and received from each site."""
    traffic = bytes_by_site(results)
    if not traffic:
        return section("bytes", "Bytes per site", "<p class=note>No traffic recorded.</p>")
    model = model_float32_bytes(results["config"])
    ups = np.array([t["up_per_round"] for t in traffic.values() if t["up_rounds"]])
    downs = np.array([t["down_per_round"] for t in traffic.values()])
    total_up = sum(t["up"] for t in traffic.values())
    total_down = sum(t["down"] for t in traffic.values())
    facts: list[tuple[str, Any]] = [
        ("model size as float32", human_bytes(model) if model else "unknown"),
        ("total sent to sites (down)", human_bytes(total_down)),
        ("total received from sites (up)", human_bytes(total_up)),
        ("per site per round, down (mean)", human_bytes(float(downs.mean()))),
    ]
    if len(ups):
        facts.append(("per site per training round, up (mean)", human_bytes(float(ups.mean()))))
        if model:
            facts.append(("up per round / float32 model", f"{ups.mean() / model:.3f}"))
    plt = pyplot()
    names = sorted(traffic)
    fig, ax = plt.subplots(figsize=(12, 3.5), constrained_layout=True)
    if len(names) <= 30:
        xs = np.arange(len(names))
        ax.bar(xs - 0.2, [traffic[n]["down"] / 2**20 for n in names], 0.4, label="down (to site)")
        ax.bar(xs + 0.2, [traffic[n]["up"] / 2**20 for n in names], 0.4, label="up (from site)")
        ax.set_xticks(xs, names, rotation=45 if len(names) > 8 else 0, ha="right",
                      fontsize="small")
        ax.set(ylabel="MiB over the run", title="Model bytes per site over the run")
        ax.legend(fontsize="small")
    else:
        totals = np.array([traffic[n]["down"] + traffic[n]["up"] for n in names]) / 2**20
        ax.hist(totals, bins=min(50, len(names)), color="tab:blue")
        ax.set(xlabel="MiB over the run (down + up)", ylabel="sites",
               title=f"Model bytes per site over the run, {len(names):,} sites")
    img = figure(fig, "bytes per site")
    return section(
        "bytes", "Bytes per site",
        img + table(["", ""], facts, cls="facts")
        + "<p class=note>Down counts the global model sent for training and for evaluation; "
        "up counts the training updates returned (evaluation replies carry no arrays).</p>",
    )
