"""`medfed run`, `runs`, `stop`: an operator submits, lists and stops runs on the aggregator."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from common.config import RUN, RunConfig
from medfed import options as opt
from medfed.console import (
    EXIT_FAILED,
    EXIT_REFUSED,
    err,
    fail,
    guard,
    out,
    print_results,
)


@opt.with_settings(RUN)
def run(
    kit: Annotated[Path, typer.Option(help="The operator kit (KITS/operator).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder to write here.")],
    test_data: Annotated[
        str | None,
        typer.Option(help="Held-out folder ON THE AGGREGATOR for central evaluation (none: "
                     "the sites' federated evaluation is used).", show_default="none"),
    ] = None,
    settings: Mapping[str, Any] = opt.FROM_FLAGS,
    app_dir: Annotated[
        Path | None,
        typer.Option("--app", help="The medfed Flower App folder.",
                     show_default="this installation's source"),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace results already in --out.")] = False,
    verbose: Annotated[bool, typer.Option(help="Show the run's whole log.")] = False,
) -> None:
    """Submit a training run to the aggregator, follow it, and write its results to --out."""
    from common.operator_kit import OperatorKit
    from common.outputs import note, prepare
    from server.artifacts import FILES
    from server.submit import OperatorError, check_credentials, find_app_dir, submit

    operator = guard(lambda: OperatorKit.load(kit))
    guard(lambda: check_credentials(operator))
    app_path = guard(lambda: find_app_dir(app_dir))
    values = {"test_data": test_data or "", **settings}
    guard(lambda: RunConfig.from_mapping(values))  # flag errors here, not on the aggregator
    # --force deletes only what medfed wrote here (common.outputs); a stale model.pt of an
    # earlier run must not sit beside the results of one that trained nothing
    guard(lambda: prepare(
        out_dir, force=force, writes=FILES,
        exists_hint="pass --force to replace it (only the files medfed wrote are deleted)",
        legacy=lambda folder: (folder / "results.json").is_file(),
    ))
    overrides: dict[str, Any] = {k.replace("_", "-"): v for k, v in values.items()}
    overrides.update({"sites-dir": "", "metrics-port": 0})

    def started(run_id: int) -> None:
        err.print(
            f"run {run_id} started on {operator.superlink}; Ctrl-C stops following it (the run "
            f"goes on: `medfed stop {run_id} --kit {kit}` ends it)", highlight=False,
        )

    try:
        result = submit(
            operator, app_dir=app_path, overrides=overrides, out_dir=out_dir,
            show=lambda line: err.print(line, highlight=False, markup=False), verbose=verbose,
            on_started=started,
        )
    except OperatorError as exc:
        raise fail(str(exc), EXIT_REFUSED if exc.refused else EXIT_FAILED) from None
    except KeyboardInterrupt:
        err.print("stopped following the run; it continues on the aggregator")
        raise typer.Exit(130) from None
    if result.reason:
        raise fail(f"run {result.run_id}: {result.reason}", EXIT_FAILED)
    if result.files:
        refusals = _refused_everywhere(json.loads((out_dir / "results.json").read_text()))
        if refusals:
            for reason in refusals:
                err.print(f"  {reason}", highlight=False, markup=False)
            raise fail(
                f"run {result.run_id}: no site trained, every one that answered refused it "
                f"(above; results in {out_dir / 'results.json'})", EXIT_REFUSED,
            )
    if result.status == "finished:stopped":
        raise fail(f"run {result.run_id} was stopped before it finished", EXIT_FAILED)
    if result.status != "finished:completed":
        raise fail(
            f"run {result.run_id} ended as {result.status}; `flwr log` on the aggregator or "
            "`medfed run --verbose` shows why", EXIT_FAILED,
        )
    note(out_dir, *result.files)
    if not result.files:
        raise fail(f"run {result.run_id} finished but sent no results", EXIT_FAILED)
    results = json.loads((out_dir / "results.json").read_text())
    code = print_results(results, out_dir)  # 3: every site refused, 1: none trained otherwise
    if code:
        raise typer.Exit(code)


def _refused_everywhere(results: dict[str, Any]) -> list[str]:
    """Each site's refusal when no site trained in any round and some refused; else []."""
    rounds = results.get("rounds") or []
    if any(entry.get("participants") for entry in rounds):
        return []
    failures = [f for entry in rounds for f in entry.get("failures") or []]
    # each refusal names its site; train and evaluate repeat the same one
    return list(dict.fromkeys(str(f["reason"]) for f in failures if f.get("kind") == "refused"))


def runs(kit: Annotated[Path, typer.Option(help="The operator kit (KITS/operator).")]) -> None:
    """List the aggregator's runs."""
    from common.operator_kit import OperatorKit
    from server.submit import OperatorError, check_credentials, list_runs

    operator = guard(lambda: OperatorKit.load(kit))
    guard(lambda: check_credentials(operator))
    try:
        listed = list_runs(operator)
    except OperatorError as exc:
        raise fail(str(exc), EXIT_REFUSED if exc.refused else EXIT_FAILED) from None
    table = Table(title=operator.superlink)
    table.add_column("run id", no_wrap=True, min_width=20)
    table.add_column("status", no_wrap=True)
    for name in ("app", "elapsed", "started"):
        table.add_column(name)
    for entry in listed:
        table.add_row(
            str(entry.get("run-id")), str(entry.get("status")), str(entry.get("fab-id")),
            f"{float(entry.get('elapsed', 0)):.0f}s", str(entry.get("running-at", "")),
        )
    out.print(table)


def stop(
    run_id: Annotated[int, typer.Argument(help="The run to stop (see `medfed runs`).")],
    kit: Annotated[Path, typer.Option(help="The operator kit (KITS/operator).")],
) -> None:
    """Stop a run on the aggregator."""
    from common.operator_kit import OperatorKit
    from server.submit import OperatorError, check_credentials, stop_run

    operator = guard(lambda: OperatorKit.load(kit))
    guard(lambda: check_credentials(operator))
    try:
        stop_run(operator, run_id)
    except OperatorError as exc:
        raise fail(str(exc), EXIT_REFUSED if exc.refused else EXIT_FAILED) from None
    out.print(f"run {run_id} stopped")
