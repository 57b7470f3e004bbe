"""A run's report: one self-contained HTML file (inline PNG plots, no external assets).

`write_report(RUN_DIR)` reads RUN_DIR/results.json (server/record.py) and writes
RUN_DIR/report.html with: run configuration, global metrics per round (central and federated),
per-site metrics, participation, epsilon per site, fairness across sites, failures and bytes per
site. Runs with many sites are summarised (heatmaps, percentile bands, worst/best tables) rather
than drawn as one line per site; a run still in progress is reported up to its last round.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from common.atomic import UMASK, write_text
from common.metrics import RATE_METRICS

REPORT = "report.html"
# the run's model card beside results.json (server.model_card.CARD_HTML; not imported here,
# which would load torch for a report)
MODEL_CARD = "model_card.html"
# Above this many sites, per-site curves become heatmaps and bands, tables list worst and best.
LINE_SITES = 12
TABLE_SITES = 40
# The participation grid is an HTML table up to this size, an image beyond.
GRID_SITES, GRID_ROUNDS = 40, 60
FAILURE_ROWS = 300

# participation codes: what a site did in a round's training stage
ABSENT, TRAINED, FAILED, REFUSED, SCREENED = 0, 1, 2, 3, 4
PARTICIPATION = {
    ABSENT: ("not sampled / no reply", "#e8e8e8"),
    TRAINED: ("update aggregated", "#2e9e44"),
    FAILED: ("failed (error, timeout)", "#d62728"),
    REFUSED: ("refused (privacy budget)", "#ff9f1c"),
    SCREENED: ("screened out", "#8e44ad"),
}


class ReportError(ValueError):
    """The run folder cannot be reported on; the message names the path and the fix."""


# --- reading ---------------------------------------------------------------------------------


def load_results(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/results.json, checked enough that the report can rely on its shape."""
    if not run_dir.exists():
        raise ReportError(
            f"{run_dir}: no such folder; pass the --out folder of a `medfed simulate` run"
        )
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a folder; pass the run folder, not a file in it")
    path = run_dir / "results.json"
    if not path.is_file():
        raise ReportError(
            f"{run_dir}: not a run folder (no results.json); pass the --out folder of a "
            "`medfed simulate` run, which writes results.json before its first round"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(
            f"{path}: not valid JSON ({exc}); the file is damaged: re-run the simulation, or "
            f"resume it with `medfed simulate --resume {run_dir}` to rewrite it"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or not isinstance(
        data.get("rounds"), list
    ):
        raise ReportError(
            f"{path}: not a medfed results file (expected an object with 'config' and "
            "'rounds'); pass the --out folder of a `medfed simulate` run"
        )
    for i, entry in enumerate(data["rounds"]):
        if not isinstance(entry, dict) or "round" not in entry:
            raise ReportError(
                f"{path}: round entry {i} is malformed (no 'round'); the file is damaged: "
                "re-run the simulation"
            )
    return data


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _fed_sites(entry: dict[str, Any]) -> dict[str, Any]:
    return ((entry.get("federated") or {}).get("sites")) or {}


def site_names(results: dict[str, Any]) -> list[str]:
    """Every site the run heard of: trained, evaluated, failed, or spent privacy."""
    names: set[str] = set(results.get("privacy") or {})
    for entry in results["rounds"]:
        names.update(_fed_sites(entry))
        names.update(entry.get("participants") or [])
        names.update(entry.get("update_bytes") or {})
        names.update(f["site"] for f in entry.get("failures") or [] if f.get("site") != "*")
    return sorted(names)


def participation_matrix(results: dict[str, Any], sites: Sequence[str]) -> np.ndarray:
    """Codes (sites x rounds) of what each site did in each round's training stage."""
    index = {name: i for i, name in enumerate(sites)}
    grid = np.full((len(sites), len(results["rounds"])), ABSENT, dtype=np.int8)
    for col, entry in enumerate(results["rounds"]):
        for name in entry.get("participants") or []:
            if name in index:
                grid[index[name], col] = TRAINED
        for failure in entry.get("failures") or []:
            row = index.get(failure.get("site", ""))
            if row is None or failure.get("stage") != "train":
                continue
            kind = str(failure.get("kind", ""))
            grid[row, col] = (
                REFUSED if kind == "refused"
                else SCREENED if kind.startswith("screened")
                else FAILED
            )
    return grid


def site_metric(results: dict[str, Any], sites: Sequence[str], stage: str, key: str) -> np.ndarray:
    """(sites x rounds) of a per-site metric (`stage` train or evaluate); NaN where absent."""
    index = {name: i for i, name in enumerate(sites)}
    values = np.full((len(sites), len(results["rounds"])), np.nan)
    for col, entry in enumerate(results["rounds"]):
        for name, report in _fed_sites(entry).items():
            value = _finite(((report or {}).get(stage) or {}).get(key))
            if value is not None and name in index:
                values[index[name], col] = value
    return values


def fairness_by_round(results: dict[str, Any], metric: str = "auc") -> list[dict[str, Any]]:
    """Per round: worst site's, mean, median and best site's federated `metric` (validation)."""
    rows = []
    for entry in results["rounds"]:
        per_site = {
            name: v
            for name, report in _fed_sites(entry).items()
            if (v := _finite(((report or {}).get("evaluate") or {}).get(metric))) is not None
        }
        if not per_site:
            continue
        values = np.array(list(per_site.values()))
        worst = min(per_site, key=per_site.__getitem__)
        rows.append(
            {
                "round": entry["round"],
                "sites": len(values),
                "worst_site": worst,
                "worst": float(values.min()),
                "p10": float(np.percentile(values, 10)),
                "median": float(np.median(values)),
                "mean": float(values.mean()),
                "best": float(values.max()),
                "gap": float(values.mean() - values.min()),
            }
        )
    return rows


def epsilon_matrix(results: dict[str, Any], sites: Sequence[str]) -> np.ndarray:
    """(sites x rounds) cumulative epsilon, carried forward over rounds a site sat out."""
    index = {name: i for i, name in enumerate(sites)}
    eps = np.full((len(sites), len(results["rounds"])), np.nan)
    for col, entry in enumerate(results["rounds"]):
        if col:
            eps[:, col] = eps[:, col - 1]
        for name, report in (entry.get("privacy") or {}).items():
            value = _finite((report or {}).get("epsilon"))
            if value is not None and name in index:
                eps[index[name], col] = value
    return eps


def bytes_by_site(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per site: total bytes down and up, rounds with traffic, and mean bytes up per round."""
    totals: dict[str, dict[str, float]] = {}
    for entry in results["rounds"]:
        for name, counts in (entry.get("update_bytes") or {}).items():
            site = totals.setdefault(name, {"down": 0.0, "up": 0.0, "rounds": 0.0,
                                             "up_rounds": 0.0})
            site["down"] += float(counts.get("down", 0))
            site["up"] += float(counts.get("up", 0))
            site["rounds"] += 1
            site["up_rounds"] += 1 if counts.get("up", 0) else 0
    for site in totals.values():
        site["up_per_round"] = site["up"] / site["up_rounds"] if site["up_rounds"] else 0.0
        site["down_per_round"] = site["down"] / site["rounds"] if site["rounds"] else 0.0
    return totals


def model_float32_bytes(config: dict[str, Any]) -> int | None:
    """Bytes of the run's model as raw float32 (parameters and buffers), None if unknown."""
    try:
        from common.config import RunConfig
        from models import build_model

        cfg = RunConfig.from_mapping(config, strict=False)
        model = build_model(cfg.model, **cfg.network_args())
    except (ValueError, TypeError, ImportError):
        return None
    return 4 * sum(t.numel() for t in model.state_dict().values())


def federation_size(results: dict[str, Any], sites: Sequence[str]) -> int:
    """Sites in the federation: the most ever connected, or those heard from if more."""
    connected = [int(r["sites_connected"]) for r in results["rounds"]
                 if isinstance(r.get("sites_connected"), int)]
    return max([len(sites), *connected])


def run_status(results: dict[str, Any]) -> tuple[str, bool]:
    """A one-line state of the run and whether it has all its configured rounds."""
    done = len(results["rounds"])
    total = int(results["config"].get("rounds", done) or done)
    last = results["rounds"][-1]["round"] if done else 0
    if done == 0:
        return "not started: no round recorded yet", False
    if last < total:
        return (
            f"in progress or stopped: {last} of {total} rounds recorded; run `medfed report` "
            "again when it ends"
        ), False
    return f"finished: {last} of {total} rounds", True


# --- rendering helpers -------------------------------------------------------------------------


def _esc(value: Any) -> str:
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
    return _esc(value)


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"  # pragma: no cover - the loop returns at GiB


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, cls: str = "") -> str:
    """An HTML table; cells already formatted as strings are escaped unless they are markup."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    thead = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    body = "".join(
        "<tr>" + "".join(f"<td>{c if isinstance(c, _Markup) else _cell(c)}</td>" for c in row)
        + "</tr>"
        for row in rows
    )
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}>{thead}<tbody>{body}</tbody></table>"


class _Markup(str):
    """A string that is already HTML."""


def _cell(value: Any) -> str:
    return _esc(value) if isinstance(value, str) else fmt(value)


def _figure(fig: Any, alt: str) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "round":  # rounds are whole numbers
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax: Any, rounds: Sequence[int], values: np.ndarray, label: str, color: str) -> None:
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


def _lines(ax: Any, rounds: Sequence[int], values: np.ndarray, sites: Sequence[str]) -> None:
    for row, name in enumerate(sites):
        mask = np.isfinite(values[row])
        if mask.any():
            ax.plot(np.asarray(rounds)[mask], values[row][mask], marker=".", label=name)


# --- sections --------------------------------------------------------------------------------


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_esc(title)}</h2>\n{body}\n</section>'


def _config_section(results: dict[str, Any], sites: Sequence[str], status: str) -> str:
    cfg = results["config"]
    rounds = results["rounds"]
    elapsed = sum(_finite(r.get("duration_s")) or 0.0 for r in rounds)
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
    if _finite(final.get("auc")) is not None:
        facts.append(
            ("final global model", f"AUC {fmt(final.get('auc'))}, accuracy "
             f"{fmt(final.get('accuracy'))} ({final.get('source', '?')} evaluation)")
        )
        if _finite(final.get("threshold")) is not None:
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
    return _section(
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


# what the per-round panels plot (the sites report the anomaly AUROC as "anomaly-auroc"); the
# table below them has every metric
PLOTTED = (*RATE_METRICS, "anomaly-auroc")


def _global_section(results: dict[str, Any]) -> str:
    plt = _plt()
    rounds = results["rounds"]
    xs = [r["round"] for r in rounds]
    has_central = any(r.get("central") for r in rounds)
    fig, (ax_c, ax_f) = plt.subplots(1, 2, figsize=(12, 3.8), constrained_layout=True)
    if has_central:
        initial = results.get("initial") or {}
        for name in PLOTTED:
            pts = [(0, initial.get(name))] if initial else []
            pts += [(r["round"], (r.get("central") or {}).get(name)) for r in rounds]
            pts = [(x, y) for x, y in pts if _finite(y) is not None]
            if pts:
                ax_c.plot(*zip(*pts, strict=True), marker="o", ms=3, label=name)
        ax_c.set(title="Global model on the central test set", xlabel="round", ylim=(0, 1.02))
        if ax_c.lines:
            ax_c.legend(loc="lower right", fontsize="small")
        else:
            _empty(ax_c, "no metric in [0, 1] for this task: see the table")
    else:
        ax_c.set(title="Central test set")
        _empty(ax_c, "no central test data")
    for name in PLOTTED:
        pts = [(x, ((r.get("federated") or {}).get("evaluate") or {}).get(name))
               for x, r in zip(xs, rounds, strict=True)]
        pts = [(x, y) for x, y in pts if _finite(y) is not None]
        if pts:
            ax_f.plot(*zip(*pts, strict=True), marker="o", ms=3, label=name)
    ax_f.set(title="Global model at the sites (federated validation, weighted mean)",
             xlabel="round", ylim=(0, 1.02))
    if ax_f.lines:
        ax_f.legend(loc="lower right", fontsize="small")
    else:
        _empty(ax_f, "no federated evaluation\n(fraction-evaluate 0, or no validation images)")
    img = _figure(fig, "global metrics per round")
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
            len(r.get("failures") or []), _finite(r.get("duration_s")),
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
    return _section("global", "Global metrics per round",
                    f"{img}{note}<div class=scroll>{tab}</div>")


def _per_site_section(results: dict[str, Any], sites: Sequence[str]) -> str:
    plt = _plt()
    rounds = [r["round"] for r in results["rounds"]]
    auc = site_metric(results, sites, "evaluate", "auc")
    loss = site_metric(results, sites, "train", "train-loss")
    many = len(sites) > LINE_SITES
    fig, (ax_a, ax_l) = plt.subplots(1, 2, figsize=(12, 3.8), constrained_layout=True)
    if many and not np.isfinite(auc).any():
        ax_a.set(title="Validation AUC per site")
        _empty(ax_a, "no site reported a validation AUC")
    if many:
        _band(ax_l, rounds, loss, "train loss", "tab:blue")
        ax_l.set(title="Local training loss across sites", xlabel="round")
        if ax_l.lines:
            ax_l.legend(fontsize="small")
    if many and np.isfinite(auc).any():
        order = _order_by_last(auc)
        im = ax_a.imshow(auc[order], aspect="auto", cmap="viridis", vmin=0, vmax=1,
                         interpolation="nearest",
                         extent=(rounds[0] - 0.5, rounds[-1] + 0.5, len(sites), 0))
        fig.colorbar(im, ax=ax_a, label="validation AUC")
        ax_a.set(title=f"Validation AUC, {len(sites):,} sites (sorted by last AUC; blank: none)",
                 xlabel="round", ylabel="site rank")
    elif not many:
        _lines(ax_a, rounds, auc, sites)
        ax_a.set(title="Global model's AUC on each site's validation images", xlabel="round",
                 ylim=(0, 1.02))
        if not ax_a.lines:
            _empty(ax_a, "no site reported a validation AUC")
        _lines(ax_l, rounds, loss, sites)
        ax_l.set(title="Local training loss per site", xlabel="round")
        for ax in (ax_a, ax_l):
            if ax.lines:
                ax.legend(fontsize="small", loc="best")
    img = _figure(fig, "per-site metrics per round")
    grid = participation_matrix(results, sites)
    eps = epsilon_matrix(results, sites)
    traffic = bytes_by_site(results)
    failures = Counter(
        f["site"] for r in results["rounds"] for f in r.get("failures") or []
    )
    rows: list[list[Any]] = []
    for i, name in enumerate(sites):
        last = _last_finite(auc[i])
        mean = float(np.nanmean(auc[i])) if np.isfinite(auc[i]).any() else None
        t = traffic.get(name, {})
        rows.append([
            name, int((grid[i] == TRAINED).sum()), last, mean, _last_finite(loss[i]),
            _last_finite(eps[i]), failures.get(name, 0),
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
    return _section("sites", "Per-site metrics per round", img + body)


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#555")
    ax.set(xticks=[], yticks=[], xlabel="")


def _order_by_last(values: np.ndarray) -> np.ndarray:
    last = np.array([_last_finite(row) for row in values], dtype=float)
    return np.argsort(np.where(np.isnan(last), np.inf, last), kind="stable")


def _last_finite(row: np.ndarray) -> float | None:
    finite = row[np.isfinite(row)]
    return float(finite[-1]) if len(finite) else None


def _participation_section(results: dict[str, Any], sites: Sequence[str]) -> str:
    rounds = [r["round"] for r in results["rounds"]]
    grid = participation_matrix(results, sites)
    legend = "".join(
        f'<span class=key><i style="background:{color}"></i>{_esc(label)}</span>'
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
            f"<tr><th class=site>{_esc(name)}</th>" + "".join(
                f'<td class=cell style="background:{PARTICIPATION[int(code)][1]}" '
                f'title="{_esc(name)}, round {r}: {PARTICIPATION[int(code)][0]}"></td>'
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
    return _section(
        "participation", "Participation",
        f"<p>Which sites' training updates reached the aggregator, per round.</p>"
        f"<p>{legend}</p>{picture}<details><summary>counts per round</summary>"
        f"<div class=scroll>{summary}</div></details>",
    )


def _participation_image(grid: np.ndarray, rounds: Sequence[int], n_sites: int) -> str:
    plt = _plt()
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
    return _figure(fig, "participation heatmap")


def _privacy_section(results: dict[str, Any], sites: Sequence[str]) -> str:
    cfg = results["config"]
    central = results.get("central_privacy")
    central_html = ""
    if isinstance(central, dict) and central:
        scalars = [(k, v) for k, v in sorted(central.items()) if not isinstance(v, dict | list)]
        central_html = "<h3>The aggregator's own (user-level) DP</h3>" + table(
            ["", ""], scalars, cls="facts"
        )
    if not cfg.get("dp"):
        return _section(
            "privacy", "Privacy: epsilon per site",
            "<p class=warn>The sites trained without DP-SGD: their updates carry no site-level "
            "privacy guarantee (epsilon is unbounded).</p>" + central_html,
        )
    plt = _plt()
    rounds = [r["round"] for r in results["rounds"]]
    eps = epsilon_matrix(results, sites)
    budget = _finite(cfg.get("budget-epsilon")) or 0.0
    target = _finite(cfg.get("target-epsilon"))
    fig, ax = plt.subplots(figsize=(12, 3.8), constrained_layout=True)
    if len(sites) > LINE_SITES:
        _band(ax, rounds, eps, "epsilon", "tab:purple")
    else:
        _lines(ax, rounds, eps, sites)
    if target is not None:
        ax.axhline(target, color="black", ls="--", lw=1, label=f"target for the run ({target:g})")
    if budget > 0:
        ax.axhline(budget, color="tab:red", ls=":", lw=1.5, label=f"site budget ({budget:g})")
    ax.set(title="Cumulative epsilon spent per site", xlabel="round", ylabel="epsilon")
    if ax.lines:
        ax.legend(fontsize="small", loc="upper left")
    img = _figure(fig, "epsilon per site over rounds")
    privacy = results.get("privacy") or {}
    final = [p.get("epsilon") for p in privacy.values() if _finite(p.get("epsilon")) is not None]
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
    return _section("privacy", "Privacy: epsilon per site", body)


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
        rows.append([_Markup(f"<b>{label}</b>"), *(values.get(k) for k in FINAL_SITE_METRICS)])
    noisy = " (DP: from noisy counts)" if results["config"].get("dp") else ""
    return (
        f"<p>The final model on each site's own validation split, at the final threshold "
        f"{fmt(final.get('threshold'))}{noisy}:</p>"
        + table(["site", *FINAL_SITE_METRICS], rows)
    )


def _fairness_section(results: dict[str, Any]) -> str:
    rows = fairness_by_round(results)
    final_table = _final_sites_table(results)
    if not rows:
        return _section(
            "fairness", "Fairness across hospitals",
            final_table
            + "<p class=note>No site reported a validation AUC (no federated evaluation, or "
            "validation splits with a single class), so worst-site performance is unknown.</p>",
        )
    plt = _plt()
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
    central = [(x, y) for x, y in central if _finite(y) is not None]
    if central:
        ax.plot(*zip(*central, strict=True), color="gray", ls=":", label="central test set")
    ax.set(title="Global model's AUC: worst site vs mean over sites (validation)",
           xlabel="round", ylim=(0, 1.02))
    ax.legend(fontsize="small", loc="lower right")
    img = _figure(fig, "fairness: worst-site vs mean AUC")
    last = rows[-1]
    summary = (
        f"<p>After round {last['round']}: worst site <b>{_esc(last['worst_site'])}</b> AUC "
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
    return _section("fairness", "Fairness across hospitals",
                    f"{final_table}{img}{summary}<details><summary>per round</summary>"
                    f"<div class=scroll>{tab}</div></details>")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
REASON_CHARS = 240


def short_reason(reason: str) -> _Markup:
    """A failure's reason for a table cell: no terminal colours, long ones cut to their end.

    Flower wraps a site's exception in Ray's traceback; its own message comes last, so a long
    reason keeps its tail. The whole text stays in the cell's tooltip.
    """
    clean = " ".join(_ANSI.sub("", reason).split())
    shown = clean if len(clean) <= REASON_CHARS else "… " + clean[-REASON_CHARS:]
    return _Markup(f'<span title="{_esc(clean)}">{_esc(shown)}</span>')


def _failures_section(results: dict[str, Any]) -> str:
    rows: list[list[Any]] = [
        [r["round"], f.get("site", "?"), f.get("stage", "?"), f.get("kind", "?"),
         short_reason(str(f.get("reason", "")))]
        for r in results["rounds"] for f in r.get("failures") or []
    ]
    if not rows:
        return _section(
            "failures", "Failures",
            f"<p>No failures in {len(results['rounds']):,} rounds: every sampled site "
            "answered.</p>",
        )
    kinds = Counter((row[3], row[2]) for row in rows)
    by_site = Counter(row[1] for row in rows)
    parts = [
        f"<p>{len(rows):,} failed replies from {len(by_site):,} site(s). Kinds: "
        "<code>error</code> (the site's code failed), <code>timeout</code> (no reply before the "
        "round timeout), <code>refused</code> (the site kept its privacy budget), "
        "<code>screened_*</code> (the aggregator rejected the update before averaging).</p>",
        '<div class="cols">',
        table(["kind", "stage", "count"], [[k, s, n] for (k, s), n in kinds.most_common()]),
        table(["site", "failures"], by_site.most_common(10)),
        "</div>",
    ]
    shown = rows[:FAILURE_ROWS]
    more = (
        f"<p class=note>First {FAILURE_ROWS} of {len(rows):,} shown; every failure is in "
        "results.json (rounds[].failures).</p>" if len(rows) > FAILURE_ROWS else ""
    )
    parts.append(
        "<div class=scroll>"
        + table(["round", "site", "stage", "kind", "reason"], shown, cls="left")
        + f"</div>{more}"
    )
    return _section("failures", "Failures", "".join(parts))


def _bytes_section(results: dict[str, Any]) -> str:
    traffic = bytes_by_site(results)
    if not traffic:
        return _section("bytes", "Bytes per site", "<p class=note>No traffic recorded.</p>")
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
    plt = _plt()
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
    img = _figure(fig, "bytes per site")
    return _section(
        "bytes", "Bytes per site",
        img + table(["", ""], facts, cls="facts")
        + "<p class=note>Down counts the global model sent for training and for evaluation; "
        "up counts the training updates returned (evaluation replies carry no arrays).</p>",
    )


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d1d1f}
header{background:#17324d;color:#fff;padding:16px 28px}
header h1{margin:0;font-size:22px} header p{margin:4px 0 0;opacity:.85}
nav{padding:8px 28px;background:#eef2f6;position:sticky;top:0}
nav a{margin-right:14px;color:#17324d;text-decoration:none}
main{padding:0 28px 40px;max-width:1250px}
section{margin-top:28px} h2{border-bottom:2px solid #17324d;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #d5dbe1;padding:3px 8px;text-align:right}
th{background:#f4f6f8} td:first-child,th:first-child{text-align:left}
table.facts td:first-child{font-weight:600} table.facts td,table.left td{text-align:left}
.scroll{max-height:420px;overflow:auto;display:inline-block;max-width:100%}
.grid td.cell{width:14px;height:14px;padding:0} .grid th.site{font-weight:normal}
.key{margin-right:14px} .key i{display:inline-block;width:12px;height:12px;margin-right:4px;
vertical-align:middle;border:1px solid #999}
.cols{display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap}
img{max-width:100%} .note{color:#555} .warn{color:#a33;font-weight:600}
.banner{background:#fff4d6;border:1px solid #e3b341;padding:8px 12px;margin-top:16px}
"""


def render_report(results: dict[str, Any], *, title: str = "", model_card: str = "") -> str:
    """The whole report as one HTML document.

    Args:
        model_card: the link to the run's model card, relative to the report ("": none).

    """
    sites = site_names(results)
    status, finished = run_status(results)
    name = title or results["config"].get("out", "medfed run")
    sections = [_config_section(results, sites, status)]
    if results["rounds"]:
        sections += [
            _global_section(results),
            _per_site_section(results, sites),
            _participation_section(results, sites),
            _privacy_section(results, sites),
            _fairness_section(results),
            _failures_section(results),
            _bytes_section(results),
        ]
    else:
        sections.append(
            "<p class=note>No round has finished yet: only the configuration is known.</p>"
        )
    banner = "" if finished else f"<p class=banner>Run {_esc(status)}.</p>"
    # a model that calls everyone one class (results.json `warnings`) is said first
    banner += "".join(f"<p class=warn>Warning: {_esc(w)}</p>"
                      for w in results.get("warnings") or [])
    nav = "".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in [("config", "configuration"), ("global", "global"), ("sites", "sites"),
                     ("participation", "participation"), ("privacy", "privacy"),
                     ("fairness", "fairness"), ("failures", "failures"), ("bytes", "bytes")]
    )
    if model_card:
        nav += f'<a href="{_esc(model_card)}">model card</a>'
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>medfed report: {_esc(name)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>medfed run report</h1><p>{_esc(name)} &middot; "
        f"{federation_size(results, sites):,} sites "
        f"&middot; {len(results['rounds']):,} rounds &middot; generated {generated}</p></header>"
        f"<nav>{nav}</nav><main>{banner}{''.join(sections)}</main></body></html>\n"
    )


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of the run in `run_dir` (default RUN_DIR/report.html); returns its path."""
    results = load_results(run_dir)
    path = out if out is not None else run_dir / REPORT
    if path.is_dir():
        raise ReportError(f"--out {path} is a folder; pass a file name such as {path / REPORT}")
    if not path.parent.is_dir():
        raise ReportError(f"--out {path}: folder {path.parent} does not exist; create it first")
    card = run_dir / MODEL_CARD
    document = render_report(
        results, title=str(run_dir),
        model_card=quote(os.path.relpath(card, path.parent)) if card.is_file() else "",
    )
    write_text(path, document, permissions=UMASK)
    return path
