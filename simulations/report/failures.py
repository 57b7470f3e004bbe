"""The report's failures section: every failed, refused or screened reply."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from simulations.report.markup import Markup, esc, section, table

FAILURE_ROWS = 300


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
REASON_CHARS = 240


def short_reason(reason: str) -> Markup:
    """A failure's reason for a table cell: no terminal colours, long ones cut to their end.

    Flower wraps a site's exception in Ray's traceback; its own message comes last, so a long
    reason keeps its tail. The whole text stays in the cell's tooltip.
    """
    clean = " ".join(_ANSI.sub("", reason).split())
    shown = clean if len(clean) <= REASON_CHARS else "… " + clean[-REASON_CHARS:]
    return Markup(f'<span title="{esc(clean)}">{esc(shown)}</span>')


def failures_section(results: dict[str, Any]) -> str:
    """Every failed reply, counted by kind and by site."""
    rows: list[list[Any]] = [
        [r["round"], f.get("site", "?"), f.get("stage", "?"), f.get("kind", "?"),
         short_reason(str(f.get("reason", "")))]
        for r in results["rounds"] for f in r.get("failures") or []
    ]
    if not rows:
        return section(
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
    return section("failures", "Failures", "".join(parts))
