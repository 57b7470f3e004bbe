"""The report's fairness section: the worst site against the mean, per round and at the end."""

from __future__ import annotations

from typing import Any

from simulations.report.data import fairness_by_round, finite
from simulations.report.markup import Markup, esc, fmt, section, table
from simulations.report.plots import figure, pyplot

FINAL_SITE_METRICS = ("auc", "sensitivity", "specificity", "balanced_accuracy", "accuracy")


def _final_sites_table(results: dict[str, Any]) -> str:
    """Each site's final metrics at the final threshold, then the worst site and the mean."""
    final = results.get("final") or {}
    per_site, summary = final.get("per_site") or {}, final.get("fairness") or {}
    if not per_site:
        return ""
    rows = [[name, *(m.get(k) for k in FINAL_SITE_METRICS)] for name, m in sorted(per_site.items())]
    for label in ("worst", "mean"):
        values = summary.get(label) or {}
        rows.append([Markup(f"<b>{label}</b>"), *(values.get(k) for k in FINAL_SITE_METRICS)])
    noisy = " (DP: from noisy counts)" if results["config"].get("dp") else ""
    return (
        f"<p>The final model on each site's own validation split, at the final threshold "
        f"{fmt(final.get('threshold'))}{noisy}:</p>"
        + table(["site", *FINAL_SITE_METRICS], rows)
    )


def fairness_section(results: dict[str, Any]) -> str:
    """The worst site against the mean over sites, per round and for the final model."""
    rows = fairness_by_round(results)
    final_table = _final_sites_table(results)
    if not rows:
        return section(
            "fairness", "Fairness across hospitals",
            final_table
            + "<p class=note>No site reported a validation AUC (no federated evaluation, or "
            "validation splits with a single class), so worst-site performance is unknown.</p>",
        )
    plt = pyplot()
    xs = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(12, 3.8), constrained_layout=True)
    ax.fill_between(xs, [r["worst"] for r in rows], [r["best"] for r in rows], alpha=0.12,
                    color="tab:blue", label="range over sites")
    ax.plot(xs, [r["mean"] for r in rows], marker="o", ms=3, label="mean over sites")
    ax.plot(xs, [r["worst"] for r in rows], marker="o", ms=3, color="tab:red",
            label="worst site")
    if rows[0]["sites"] >= 10:
        ax.plot(xs, [r["p10"] for r in rows], ls="--", color="tab:orange", label="10th pct")
    central = [(r["round"], (r.get("central") or {}).get("auc")) for r in results["rounds"]]
    central = [(x, y) for x, y in central if finite(y) is not None]
    if central:
        ax.plot(*zip(*central, strict=True), color="gray", ls=":", label="central test set")
    ax.set(title="Global model's AUC: worst site vs mean over sites (validation)",
           xlabel="round", ylim=(0, 1.02))
    ax.legend(fontsize="small", loc="lower right")
    img = figure(fig, "fairness: worst-site vs mean AUC")
    last = rows[-1]
    summary = (
        f"<p>After round {last['round']}: worst site <b>{esc(last['worst_site'])}</b> AUC "
        f"{fmt(last['worst'])} against a mean of {fmt(last['mean'])} over {last['sites']:,} "
        f"sites (gap {fmt(last['gap'])}; worst/mean {fmt(last['worst'] / last['mean'])}).</p>"
        if last["mean"] else ""
    )
    tab = table(
        ["round", "sites", "worst site", "worst AUC", "p10", "median", "mean", "best",
         "mean - worst"],
        [[r["round"], r["sites"], r["worst_site"], r["worst"], r["p10"], r["median"], r["mean"],
          r["best"], r["gap"]] for r in rows],
    )
    return section("fairness", "Fairness across hospitals",
                    f"{final_table}{img}{summary}<details><summary>per round</summary>"
                    f"<div class=scroll>{tab}</div></details>")
