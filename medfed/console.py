"""What every `medfed` command shares: exit codes, consoles and turning errors into messages.

Exit codes (every command):
    0  success
    1  the run failed for a reason that is not the input's fault (see the message / --debug)
    2  bad input or usage: a flag, a file or a site folder is wrong; the message says which and how
       to fix it
    3  refused by policy (e.g. a privacy budget would be exceeded, or the aggregator refuses this
       site's key or certificate)
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.config import ConfigError
from common.registry import FINAL_METRICS

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REFUSED = 0, 1, 2, 3

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")
state = {"debug": False}


def configure_logging() -> None:
    """The log format of the long-running commands (server, site)."""
    from common import logs

    logs.configure()


def fail(message: str, code: int) -> typer.Exit:
    """Print an error line and return the Exit to raise."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def guard(fn: Callable[[], T]) -> T:
    """Turn user mistakes into a one-line message and exit code 2, never a bare traceback."""
    from common.data import DataError

    try:
        return fn()
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError) as exc:
        if state["debug"]:
            traceback.print_exc()
        raise fail(str(exc), EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:  # the run broke: say so, keep the traceback behind --debug
        if state["debug"]:
            traceback.print_exc()
        err.print(
            f"[bold red]failed:[/] {type(exc).__name__}: {exc}\n"
            "Re-run with `medfed --debug ...` for the full traceback.",
            highlight=False,
        )
        raise typer.Exit(EXIT_FAILED) from None


def given(**values: Any) -> dict[str, Any]:
    """The options the user set (None means "not given"), enums as their values."""
    return {k: (v.value if isinstance(v, Enum) else v) for k, v in values.items() if v is not None}


def print_results(results: dict[str, Any], run_dir: Path) -> int:
    """The global model's final metrics, each site's privacy spend, and where the files are.

    Returns the exit code the run's outcome calls for (results.json `outcome`): 0 when its last
    round trained, 3 when every site refused by policy, 1 otherwise; then it says why, site by
    site, and shows no metrics for a model that never trained.
    """
    outcome = results.get("outcome") or {"status": "trained", "exit_code": 0, "trained": True}
    final = results.get("final", {})
    if outcome.get("trained", True):
        table = Table("metric", "value", title=f"Global model after {len(results['rounds'])} "
                      f"rounds ({final.get('source', 'central')} evaluation)")
        for key in FINAL_METRICS:
            if isinstance(final.get(key), int | float):
                table.add_row(key, f"{final[key]:.4f}")
        if table.row_count:
            out.print(table)
        else:
            out.print(f"Global model after {len(results['rounds'])} rounds: not evaluated (no "
                      "central test set, and no site's evaluation came back)")
        _print_sites(final)
    privacy = results.get("privacy", {})
    if privacy and any(p.get("dp") and p.get("epsilon") is not None for p in privacy.values()):
        ptable = Table("site", "epsilon", "delta", "noise", "steps", title="Privacy spent per site")
        for site, p in privacy.items():
            if p.get("epsilon") is None:
                continue
            ptable.add_row(
                site, f"{p['epsilon']:.3f}", f"{p['delta']:g}", f"{p['noise_multiplier']:.3f}",
                str(p["steps"]),
            )
        out.print(ptable)
    out.print(f"results: {run_dir / 'results.json'}")
    if (run_dir / "model.pt").is_file() and outcome.get("trained", True):
        out.print(f"model:   {run_dir / 'model.pt'}")
    out.print(f"plot:    {run_dir / 'metrics.png'}")
    if (run_dir / "model_card.html").is_file():
        out.print(f"card:    {run_dir / 'model_card.html'}")
    for warning in results.get("warnings") or []:  # a degenerate model: said, not an error
        err.print(f"[bold yellow]warning:[/] [yellow]{escape(warning)}[/]", highlight=False)
    return _print_outcome(outcome, run_dir)


_SITE_KEYS = ("auc", "sensitivity", "specificity", "balanced_accuracy")


def _print_sites(final: dict[str, Any]) -> None:
    """Each site's own validation metrics at the final threshold, the worst and the mean."""
    per_site, summary = final.get("per_site") or {}, final.get("fairness") or {}
    if not per_site:
        return
    table = Table("site", *_SITE_KEYS, title="Per site, own validation split, final threshold")

    def cells(values: dict[str, Any]) -> list[str]:
        return [f"{values[k]:.3f}" if isinstance(values.get(k), int | float) else "-"
                for k in _SITE_KEYS]

    for name, values in sorted(per_site.items()):
        table.add_row(name, *cells(values))
    for label in ("worst", "mean"):
        table.add_row(f"[bold]{label}[/]", *cells(summary.get(label) or {}))
    out.print(table)


def _print_outcome(outcome: dict[str, Any], run_dir: Path) -> int:
    status = outcome.get("status", "trained")
    if status == "trained":
        return EXIT_OK
    label = "refused" if status == "refused" else "failed"
    err.print(f"[bold red]{label}:[/] {outcome.get('reason', '')}", highlight=False)
    for site, failure in sorted((outcome.get("sites") or {}).items()):
        err.print(f"  {site}: {failure.get('kind')}: {failure.get('reason')}", highlight=False,
                  markup=False)
    last = outcome.get("last_trained_round")
    if outcome.get("trained") and last is not None:
        err.print(f"the model in {run_dir / 'model.pt'} is round {last}'s, the last round that "
                  "trained a site", highlight=False)
    else:
        err.print("no round trained a site: no model was written (results.json: outcome)",
                  highlight=False)
    return int(outcome.get("exit_code", EXIT_REFUSED if status == "refused" else EXIT_FAILED))
