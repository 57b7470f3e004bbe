"""The report's first sections: the run's configuration and the global metrics per round."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.metrics import RATE_METRICS
from common.registry import SITE_ANOMALY_AUROC
from simulations.report.data import federation_size, finite
from simulations.report.markup import fmt, section, table
from simulations.report.plots import empty_panel, figure, pyplot


def config_section(results: dict[str, Any], sites: Sequence[str], status: str) -> str:
    """The run's state, its headline facts and every setting."""
    cfg = results["config"]
    rounds = results["rounds"]
    elapsed = sum(finite(r.get("duration_s")) or 0.0 for r in rounds)
    facts = [
        ("state", status),
        ("run id", cfg.get("run-key", "")),
        ("started", results.get("started", "")),
        ("sites", _sites_text(results, sites)),
        ("rounds recorded", f"{len(rounds):,} of {cfg.get('rounds', '?')}"),
        ("time in rounds", f"{elapsed:.1f} s"),
        ("privacy", f"DP-SGD, target epsilon {cfg.get('target-epsilon')} per site, delta "
         f"{cfg.get('delta')}" if cfg.get("dp") else "no DP (no privacy guarantee)"),
        ("central test data", cfg.get("test-data") or "none (sites' test splits, if any)"),
    ]
    final = results.get("final") or {}
    if finite(final.get("auc")) is not None:
        facts.append(
            ("final global model", f"AUC {fmt(final.get('auc'))}, accuracy "
             f"{fmt(final.get('accuracy'))} ({final.get('source', '?')} evaluation)")
        )
        if finite(final.get("threshold")) is not None:
            point = final.get("operating_point") or {}
            rule = point.get("rule", "default 0.5: no site sent validation histograms")
            facts.append(
                ("operating point", f"P(positive) >= {fmt(final.get('threshold'))} ({rule}): "
                 f"sensitivity {fmt(final.get('sensitivity'))}, specificity "
                 f"{fmt(final.get('specificity'))}, balanced accuracy "
                 f"{fmt(final.get('balanced_accuracy'))}; ECE {fmt(final.get('ece'))}, "
                 f"Brier {fmt(final.get('brier'))}")
            )
    elif rounds:
        facts.append(("final global model", "not evaluated (no central or federated "
                      "evaluation in this run)"))
    left = table(["", ""], facts, cls="facts")
    right = table(["setting", "value"], sorted(cfg.items()), cls="config")
    return section(
        "config", "Run configuration",
        f'<div class="cols"><div>{left}</div><details><summary>all {len(cfg)} settings'
        f"</summary>{right}</details></div>",
    )


def _sites_text(results: dict[str, Any], sites: Sequence[str]) -> str:
    size = federation_size(results, sites)
    if size == len(sites):
        return f"{size:,}"
    return (f"{size:,} in the federation, {len(sites):,} of them sampled at least once (the "
            "others never appear below)")


# what the per-round panels plot (the sites' own anomaly AUROC among them); the table below them
# has every metric
PLOTTED = (*RATE_METRICS, SITE_ANOMALY_AUROC)


def global_section(results: dict[str, Any]) -> str:
    """The global model's metrics per round, central and federated."""
    plt = pyplot()
    rounds = results["rounds"]
    xs = [r["round"] for r in rounds]
    has_central = any(r.get("central") for r in rounds)
    fig, (ax_c, ax_f) = plt.subplots(1, 2, figsize=(12, 3.8), constrained_layout=True)
    if has_central:
        initial = results.get("initial") or {}
        for name in PLOTTED:
            pts = [(0, initial.get(name))] if initial else []
            pts += [(r["round"], (r.get("central") or {}).get(name)) for r in rounds]
            pts = [(x, y) for x, y in pts if finite(y) is not None]
            if pts:
                ax_c.plot(*zip(*pts, strict=True), marker="o", ms=3, label=name)
        ax_c.set(title="Global model on the central test set", xlabel="round", ylim=(0, 1.02))
        if ax_c.lines:
            ax_c.legend(loc="lower right", fontsize="small")
        else:
            empty_panel(ax_c, "no metric in [0, 1] for this task: see the table")
    else:
        ax_c.set(title="Central test set")
        empty_panel(ax_c, "no central test data")
    for name in PLOTTED:
        pts = [(x, ((r.get("federated") or {}).get("evaluate") or {}).get(name))
               for x, r in zip(xs, rounds, strict=True)]
        pts = [(x, y) for x, y in pts if finite(y) is not None]
        if pts:
            ax_f.plot(*zip(*pts, strict=True), marker="o", ms=3, label=name)
    ax_f.set(title="Global model at the sites (federated validation, weighted mean)",
             xlabel="round", ylim=(0, 1.02))
    if ax_f.lines:
        ax_f.legend(loc="lower right", fontsize="small")
    else:
        empty_panel(ax_f, "no federated evaluation\n(fraction-evaluate 0, or no validation images)")
    img = figure(fig, "global metrics per round")
    rows = []
    for r in rounds:
        c = r.get("central") or {}
        fe = (r.get("federated") or {}).get("evaluate") or {}
        ft = (r.get("federated") or {}).get("train") or {}
        rows.append([
            r["round"], c.get("auc"), c.get("accuracy"), c.get("sensitivity"),
            c.get("specificity"), c.get("loss"), fe.get("auc"), fe.get("accuracy"),
            fe.get("loss"), ft.get("train-loss"),
            f"{len(r.get('participants') or [])}/{len(r.get('sampled') or [])}",
            len(r.get("failures") or []), finite(r.get("duration_s")),
        ])
    has_federated = any(((r.get("federated") or {}).get("evaluate") or {}) for r in rounds)
    note = ""
    if not has_central:
        note = (
            "<p class=note>This run had no central test data: the central columns are empty"
            + (" and the global model is judged by the sites' validation images only.</p>"
               if has_federated else ", and no site evaluated the global model either: this "
               "run's quality is unmeasured.</p>")
        )
    tab = table(
        ["round", "central AUC", "accuracy", "sensitivity", "specificity", "loss",
         "federated AUC", "accuracy", "loss", "train loss", "trained/sampled", "failures",
         "seconds"],
        rows,
    )
    return section("global", "Global metrics per round",
                    f"{img}{note}<div class=scroll>{tab}</div>")
