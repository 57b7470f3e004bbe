"""The report's privacy section: epsilon spent per site, and the aggregator's own DP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from simulations.report.data import epsilon_matrix, finite
from simulations.report.markup import fmt, section, table
from simulations.report.plots import LINE_SITES, band, figure, pyplot, site_lines


def privacy_section(results: dict[str, Any], sites: Sequence[str]) -> str:
    """Epsilon spent per site over rounds, against the target and the site budget."""
    cfg = results["config"]
    central = results.get("central_privacy")
    central_html = ""
    if isinstance(central, dict) and central:
        scalars = [(k, v) for k, v in sorted(central.items()) if not isinstance(v, dict | list)]
        central_html = "<h3>The aggregator's own (user-level) DP</h3>" + table(
            ["", ""], scalars, cls="facts"
        )
    if not cfg.get("dp"):
        return section(
            "privacy", "Privacy: epsilon per site",
            "<p class=warn>The sites trained without DP-SGD: their updates carry no site-level "
            "privacy guarantee (epsilon is unbounded).</p>" + central_html,
        )
    plt = pyplot()
    rounds = [r["round"] for r in results["rounds"]]
    eps = epsilon_matrix(results, sites)
    budget = finite(cfg.get("budget-epsilon")) or 0.0
    target = finite(cfg.get("target-epsilon"))
    fig, ax = plt.subplots(figsize=(12, 3.8), constrained_layout=True)
    if len(sites) > LINE_SITES:
        band(ax, rounds, eps, "epsilon", "tab:purple")
    else:
        site_lines(ax, rounds, eps, sites)
    if target is not None:
        ax.axhline(target, color="black", ls="--", lw=1, label=f"target for the run ({target:g})")
    if budget > 0:
        ax.axhline(budget, color="tab:red", ls=":", lw=1.5, label=f"site budget ({budget:g})")
    ax.set(title="Cumulative epsilon spent per site", xlabel="round", ylabel="epsilon")
    if ax.lines:
        ax.legend(fontsize="small", loc="upper left")
    img = figure(fig, "epsilon per site over rounds")
    privacy = results.get("privacy") or {}
    final = [p.get("epsilon") for p in privacy.values() if finite(p.get("epsilon")) is not None]
    facts = [
        ("target epsilon (whole run, per site)", target),
        ("delta", cfg.get("delta")),
        ("privacy budget per site (all runs)", budget if budget > 0 else "none set"),
        ("sites with a privacy record", len(privacy)),
        ("epsilon spent: min / median / max",
         " / ".join(fmt(v) for v in (min(final), float(np.median(final)), max(final)))
         if final else "–"),
    ]
    refused = sum(
        1 for r in results["rounds"] for f in r.get("failures") or [] if f.get("kind") == "refused"
    )
    if refused:
        facts.append(("training requests refused by a site's budget", refused))
    body = img + table(["", ""], facts, cls="facts") + central_html
    return section("privacy", "Privacy: epsilon per site", body)
