"""A run's report: one self-contained HTML file (inline PNG plots, no external assets).

`write_report(RUN_DIR)` reads RUN_DIR/results.json (server/record.py) and writes
RUN_DIR/report.html with: run configuration, global metrics per round (central and federated),
per-site metrics, participation, epsilon per site, fairness across sites, failures and bytes per
site. Runs with many sites are summarised (heatmaps, percentile bands, worst/best tables) rather
than drawn as one line per site; a run still in progress is reported up to its last round.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from common.atomic import UMASK, write_text
from simulations.report.data import (
    ReportError,
    federation_size,
    load_results,
    run_status,
    site_names,
)
from simulations.report.failures import failures_section
from simulations.report.fairness import fairness_section
from simulations.report.markup import esc
from simulations.report.overview import config_section, global_section
from simulations.report.privacy import privacy_section
from simulations.report.sites import participation_section, per_site_section
from simulations.report.traffic import bytes_section

REPORT = "report.html"
# the run's model card beside results.json (server.model_card.CARD_HTML; not imported here,
# which would load torch for a report)
MODEL_CARD = "model_card.html"




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
    sections = [config_section(results, sites, status)]
    if results["rounds"]:
        sections += [
            global_section(results),
            per_site_section(results, sites),
            participation_section(results, sites),
            privacy_section(results, sites),
            fairness_section(results),
            failures_section(results),
            bytes_section(results),
        ]
    else:
        sections.append(
            "<p class=note>No round has finished yet: only the configuration is known.</p>"
        )
    banner = "" if finished else f"<p class=banner>Run {esc(status)}.</p>"
    # a model that calls everyone one class (results.json `warnings`) is said first
    banner += "".join(f"<p class=warn>Warning: {esc(w)}</p>"
                      for w in results.get("warnings") or [])
    nav = "".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in [("config", "configuration"), ("global", "global"), ("sites", "sites"),
                     ("participation", "participation"), ("privacy", "privacy"),
                     ("fairness", "fairness"), ("failures", "failures"), ("bytes", "bytes")]
    )
    if model_card:
        nav += f'<a href="{esc(model_card)}">model card</a>'
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>medfed report: {esc(name)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>medfed run report</h1><p>{esc(name)} &middot; "
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
