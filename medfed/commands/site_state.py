"""`medfed site budget|audit`: what a site's state says (privacy spent, what left the site)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medfed import options as opt
from medfed.console import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    fail,
    guard,
    out,
)


def budget(
    data: Annotated[Path, typer.Option(help="The site's image folder (the dataset).")],
    ledger_dir: opt.LedgerDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the privacy spent on a dataset over all runs, against its budget."""
    from client.ledger import PrivacyLedger

    ledger = guard(lambda: PrivacyLedger(data, ledger_dir))
    entry = guard(lambda: ledger.read().to_dict())
    if as_json:
        print(json.dumps(entry, indent=2))
        return
    budget_text = f"{entry['budget_epsilon']:g}" if entry["budget_epsilon"] else "none set"
    spent = entry["epsilon_spent"]
    spent_text = f"{spent:.3f}" if isinstance(spent, float | int) else "inf (trained without DP)"
    out.print(
        f"dataset {entry['dataset']} ({entry['images']} images, by content): epsilon "
        f"{spent_text} spent on its most-spent image (delta {entry['delta']:g}), "
        f"budget {budget_text}", highlight=False,
    )
    for run, steps in entry["runs"].items():
        shown = f"{steps} DP-SGD steps" if isinstance(steps, int) else steps
        out.print(f"  run {run}: {shown}", highlight=False)


def audit(
    state_dir: Annotated[
        Path, typer.Option("--state", help="The site's state folder (as given to `medfed site`).")
    ],
    verify_chain: Annotated[
        bool, typer.Option("--verify", help="Check the trail: its hash chain, that it ends in "
                           "its signed head, and the head's key.")
    ] = False,
    witness: Annotated[
        Path | None,
        typer.Option("--witness", help="A run's results.json: with --verify, every audit head "
                     "the aggregator recorded for this site must be in the trail."),
    ] = None,
    site_name: Annotated[
        str | None,
        typer.Option("--site", help="The site's name in --witness \\[default: the --kit's "
                     "site, else the --state folder's name]."),
    ] = None,
    kit: Annotated[
        Path | None,
        typer.Option(help="This site's kit: with --verify, the head must be signed with its "
                     "key (site.pub)."),
    ] = None,
    last: Annotated[int, typer.Option(help="Show the last N entries.")] = 10,
) -> None:
    """Show what left this site (the audit trail), or verify that the trail is intact.

    With --verify, exit codes: 0 the trail is intact (or the folder is a site state that has
    sent no reply yet), 1 the trail was altered, cut, emptied, deleted or re-signed (the message
    says which), 2 --state is not a site's state folder, or --witness not a results.json that
    names the site.
    """
    from client.audit_state import TRAIL, NotSiteState, TrailAltered, verify_state

    path = state_dir / TRAIL
    if verify_chain:
        site_key = None
        if kit is not None:
            from common.kit import SiteKit

            site_kit = guard(lambda: SiteKit.load(kit, check_permissions=False))
            site_key = site_kit.public_key.read_text()
            site_name = site_name or site_kit.site
        try:
            report = verify_state(state_dir, site_key=site_key, witness=witness, site=site_name)
        except NotSiteState as exc:
            raise fail(str(exc), EXIT_BAD_INPUT) from None
        except TrailAltered as exc:
            raise fail(f"audit trail altered: {exc}", EXIT_FAILED) from None
        out.print(report.summary(state_dir), highlight=False)
        return
    if witness is not None or kit is not None:
        raise fail("--witness and --kit check the trail: use them with --verify", EXIT_BAD_INPUT)
    if not path.is_file():
        raise fail(f"{path}: no audit trail (nothing has left this site yet)", EXIT_BAD_INPUT)
    table = Table("seq", "time", "run", "round", "type", "bytes", "metrics", title=str(path))
    lines = path.read_text().splitlines()[-last:]
    for line in lines:
        entry = json.loads(line)
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in entry.get("metrics", {}).items())
        table.add_row(
            str(entry["seq"]), entry["time"], str(entry.get("run")), str(entry.get("round")),
            str(entry.get("message_type")), str(entry.get("bytes")), metrics,
        )
    out.print(table)
