"""The model card's HTML: drawn from the card's dict (server.model_card.collect) alone.

One self-contained page (inline CSS, nothing fetched), every string escaped: a site name is
whatever a hospital chose to call itself.
"""

from __future__ import annotations

import html
import math
from typing import Any


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    """A value for a table cell, escaped; numbers as results.json has them, to 4 digits."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "–"
    if isinstance(value, dict):
        return _esc(", ".join(f"{k}: {_plain(v)}" for k, v in value.items()))
    if isinstance(value, list):
        return _esc(", ".join(_plain(v) for v in value))
    return _esc(value)


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "–"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_plain(v)}" for k, v in value.items()) + "}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _facts(pairs: list[tuple[str, Any]]) -> str:
    return _table(["", ""], [[k, v] for k, v in pairs if v is not None])


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{_esc(anchor)}"><h2>{_esc(title)}</h2>{body}</section>'


def _data_html(card: dict[str, Any]) -> str:
    data = card["data"]
    rows = []
    for site in card["sites"]:
        facts = data["sites"][site]
        counts = facts.get("classes_per_split")
        rows.append([site, facts.get("train_examples"), facts.get("val_examples"),
                     facts.get("cross_site_examples"), facts.get("cross_site_split"),
                     {s: c for s, c in counts.items()} if counts is not None else None])
    body = _table(["site", "train examples", "validation examples", "cross-site examples",
                   "cross-site split", "labelled rows per split and class"], rows)
    central = data.get("central_test") or {}
    body += _facts([
        ("class counts", data["class_counts"]),
        ("input", data["input"]),
        ("modalities", data["modalities"]),
        ("segmentation plan (pooled)", data.get("plan")),
        ("central test set", central.get("source") if central else "none"),
        ("central test classes", central.get("classes")),
    ])
    return _section("data", "Data", body)


def _training_html(card: dict[str, Any]) -> str:
    training = card["training"]
    privacy = training["privacy"]
    body = _facts([
        ("strategy", training["strategy"]),
        ("rounds", f"{training['rounds_completed']} completed of "
         f"{training['rounds_configured']} ({training['rounds_trained']} trained a site)"),
        ("local epochs", training["local_epochs"]),
        ("local steps", training["local_steps"]),
        ("batch size", training["batch_size"]),
        ("optimizer", f"{training['optimizer']}, lr {training['lr']:g}"),
        ("network", training["network"]),
        ("secure aggregation", training["secure_aggregation"]),
        ("differential privacy", (f"DP-SGD at each site, target epsilon "
                                  f"{privacy['target_epsilon']:g}, delta {privacy['delta']:g}"
                                  if privacy["dp"] else "none")),
        ("central (user-level) DP", privacy.get("central")),
    ])
    keys = ("epsilon", "validation_epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
            "accountant")
    rows = [[site, *((privacy["sites"].get(site) or {}).get(k) for k in keys)]
            for site in card["sites"]]
    body += _table(["site", *keys], rows)
    return _section("training", "Training", body)


def _performance_html(card: dict[str, Any]) -> str:
    perf = card["performance"]
    cross = perf["cross_site"]
    final = perf["final"]
    shown = [k for k, v in final.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    body = (f"<h3>Global model ({_esc(perf['source'])} evaluation)</h3>"
            + _table(["metric", "value"], [[k, final[k]] for k in shown])
            if perf["source"] else "<h3>Global model: not evaluated</h3>")
    if perf["calibration"]:
        body += "<h3>Calibration</h3>" + _facts(list(perf["calibration"].items()))
    if perf["operating_point"]:
        body += "<h3>Operating point</h3>" + _facts(list(perf["operating_point"].items()))
    metrics = sorted({k for v in cross["sites"].values() for k in v
                      if k not in ("split", "num-examples")})
    body += (f"<h3>Per site: the final model (round {_cell(cross['round'])}) on each site's own "
             "held-out split</h3>")
    if cross["skipped"]:
        return _section("performance", "Performance",
                        body + f"<p>Not evaluated: {_esc(cross['skipped'])}</p>")
    rows = [[site, (cross["sites"].get(site) or {}).get("split"),
             (cross["sites"].get(site) or {}).get("num-examples"),
             *((cross["sites"].get(site) or {}).get(m) for m in metrics)]
            for site in card["sites"] if site in cross["sites"]]
    for label in ("worst", "mean", "spread"):
        rows.append([label, None, None, *(cross["summary"].get(m, {}).get(label)
                                          for m in metrics)])
    rows.append(["worst site", None, None, *(cross["summary"].get(m, {}).get("worst_site")
                                             for m in metrics)])
    body += _table(["site", "split", "examples", *metrics], rows)
    if cross["failed"]:
        body += "<p>Sites that did not evaluate it:</p>" + _table(
            ["site", "reason"], [[s, r] for s, r in sorted(cross["failed"].items())])
    worst = perf["worst_site"]
    if worst:
        body += (f"<p>Worst site by {_esc(worst['metric'])}: <b>{_esc(worst['site'])}</b> "
                 f"({_cell(worst['value'])}).</p>")
    return _section("performance", "Performance", body)


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:0 16px;
color:#222} h1{margin-bottom:4px} h2{border-bottom:1px solid #ddd;margin-top:28px}
table{border-collapse:collapse;margin:8px 0} th,td{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top} th{background:#f3f3f3} .note{color:#555}
li{margin:4px 0}
"""


def render(card: dict[str, Any]) -> str:
    """The card as one self-contained HTML document (no external asset; every string escaped)."""
    run = card["run"]
    use = card["intended_use"]
    task = card["task"]
    limits = "".join(f"<li>{_esc(s)}</li>" for s in card["limitations"]) or "<li>none found</li>"
    sections = [
        _section("use", "Intended use and task",
                 f"<p>{_esc(use['summary'])}</p><p class=note>{_esc(use['out_of_scope'])}</p>"
                 + _facts([("task", task["task"]), ("model", task["model"]),
                           ("classes", task["num_classes"]),
                           ("sites", f"{len(card['sites'])}: {', '.join(card['sites'])}")])),
        _data_html(card),
        _training_html(card),
        _performance_html(card),
        _section("limitations", "Limitations", f"<ul>{limits}</ul>"),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>medfed model card: {_esc(run['run_key'] or task['task'])}</title>"
        f"<style>{CSS}</style></head><body><h1>Model card</h1>"
        f"<p class=note>run {_esc(run['run_key'])} &middot; started {_esc(run['started'])} "
        f"&middot; {_esc(run['status'])} &middot; from {_esc(run['results'])}, generated "
        f"{_esc(card['generated'])}</p>{''.join(sections)}</body></html>\n"
    )
