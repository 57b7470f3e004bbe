"""`medfed simulate`: a federation of virtual sites on this machine, and `medfed report`."""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from common.config import SIMULATE, ConfigError, RunConfig
from common.logs import settle_known_warnings
from common.registry import HEADLINE_METRICS
from medfed import options as opt
from medfed.console import (
    err,
    given,
    guard,
    out,
    print_results,
)

if TYPE_CHECKING:
    from server.exporter import MetricsSettings
    from server.run import ProgressFn
    from simulations.scenario import Federation


@opt.with_settings(SIMULATE)
def simulate(
    data: Annotated[
        Path | None, typer.Option(help="Folder holding one folder per site (each with labels.csv).")
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Run folder to write.",
                     show_default="a new runs/YYYYMMDD-HHMMSS folder"),
    ] = None,
    settings: Mapping[str, Any] = opt.FROM_FLAGS,
    scenario: Annotated[
        Path | None,
        typer.Option(
            help="Scenario TOML (sites, data partition, faults, resources, run settings; see "
            "simulations/scenarios/README.md). Flags given here override it."
        ),
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue a run from its last checkpoint.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(help="Replace a run already in --out: deletes only the files medfed wrote "
                          "there (RUN_DIR/.medfed-run.json); your own files stay."),
    ] = False,
    verbose: Annotated[
        bool, typer.Option(help="Show Flower's and Ray's logs (sites' tracebacks included).")
    ] = False,
    metrics_port: Annotated[
        int,
        typer.Option(
            min=0, max=65535,
            help="Port of the live dashboard (/) and Prometheus metrics (/metrics); 0 turns "
            "both off.",
        ),
    ] = 9400,
    metrics_host: Annotated[
        str,
        typer.Option(
            help="Address the dashboard listens on: 127.0.0.1 is this machine only, 0.0.0.0 "
            "every network interface."
        ),
    ] = "127.0.0.1",
) -> None:
    """Simulate a federation: every site folder under --data becomes a virtual hospital.

    While it runs, http://127.0.0.1:9400/ shows the rounds, the global model's curves and each
    site's privacy spend; Prometheus scrapes /metrics on the same port.
    """
    from server.exporter import MetricsSettings
    from simulations.runner import resume_config
    from simulations.scenario import Federation, Scenario

    overrides = {
        **settings, **given(sites_dir=str(data) if data else None,
                            out=str(out_dir) if out_dir else None),
    }

    def build() -> tuple[RunConfig, Federation | None]:
        if resume is not None:
            if scenario is not None:
                raise ConfigError(
                    "--scenario and --resume together: a resumed run keeps the scenario it was "
                    "started with (RUN_DIR/scenario.json); drop --scenario"
                )
            return resume_config(resume, overrides), Federation.saved(resume)
        if scenario is not None:
            loaded = Scenario.load(scenario)
            run_cfg = loaded.config(overrides)
            if not run_cfg.sites_dir:
                raise ConfigError(f"{scenario}: set data.path in the scenario, or pass --data")
            if "out" not in loaded.run and out_dir is None:
                raise ConfigError(f"{scenario}: set run.out in the scenario, or pass --out")
            return run_cfg, loaded.federation
        if data is None:
            raise ConfigError("--data is required (or --resume RUN_DIR)")
        if out_dir is None:  # a new folder per run: a second run never meets the first's files
            overrides["out"] = str(_new_run_dir())
        return RunConfig.from_mapping(overrides), None

    cfg, federation = guard(build)
    # Name the run here, so that the dashboard and the run's files show the same id.
    cfg = cfg.replace(run_key=cfg.run_key or uuid.uuid4().hex)
    metrics = guard(lambda: MetricsSettings(port=metrics_port, host=metrics_host))
    # before Ray starts its workers, which inherit the filters' "explained" mark (common.logs);
    # without --verbose the workers' output, warnings included, is not shown at all
    settle_known_warnings(
        (lambda line: err.print(line, highlight=False, markup=False)) if verbose else None
    )
    results = guard(
        lambda: _simulate_with_metrics(
            cfg, resume is not None, verbose, force, metrics, federation
        )
    )
    code = print_results(results, Path(cfg.out))
    _write_report_after_run(Path(cfg.out))
    if code:  # the run ended but its last round trained no site: 3 refused, 1 failed
        raise typer.Exit(code)


def _new_run_dir(root: Path = Path("runs")) -> Path:
    """A run folder that does not exist yet: runs/YYYYMMDD-HHMMSS, suffixed if taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = root / stamp, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{stamp}-{n}"
    return candidate


def _write_report_after_run(run_dir: Path) -> None:
    """The run's HTML report; a report that cannot be written never fails a finished run."""
    from common.outputs import note
    from simulations.report import write_report

    try:
        path = write_report(run_dir)
        note(run_dir, path)
        out.print(f"report:  {path}")
    except Exception as exc:  # the run itself succeeded: say so and how to retry
        err.print(
            f"[yellow]warning:[/] report not written ({type(exc).__name__}: {exc}); "
            f"retry with `medfed report {run_dir}`",
            highlight=False,
        )


def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (the --out of `simulate`).")],
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="HTML file to write.", show_default="RUN_DIR/report.html"),
    ] = None,
) -> None:
    """Write a run's self-contained HTML report: metrics, sites, privacy, fairness, failures."""
    from simulations.report import write_report

    path = guard(lambda: write_report(run_dir, out_file))
    out.print(f"report: {path}")


def _simulate_with_metrics(
    cfg: RunConfig,
    resume: bool,
    verbose: bool,
    force: bool,
    settings: MetricsSettings,
    federation: Federation | None = None,
) -> dict[str, Any]:
    """Run the simulation with the dashboard and /metrics up for its whole length."""
    from server.exporter import serve_metrics
    from server.record import checkpoint_state
    from simulations.runner import simulate
    from simulations.scenario import Federation
    from simulations.sites import simulated_sites

    federation = federation or Federation()
    run_simulation = functools.partial(simulate, federation=federation)
    # Bad --data (or a bad scenario) is reported as such, before a port is taken.
    sites = simulated_sites(cfg, federation, Path(cfg.out).resolve()).names
    with serve_metrics(settings) as server:
        if server is None:
            return _run_with_progress(cfg, resume, verbose, force, run_simulation)
        metrics = server.metrics
        metrics.start_run(
            run_id=cfg.run_key, task=cfg.task, strategy=cfg.strategy, total_rounds=cfg.rounds,
            dp=cfg.dp, target_epsilon=cfg.target_epsilon, sites=sites,
        )
        if resume:
            metrics.replay(checkpoint_state(Path(cfg.out))["rounds"], cfg.rounds)
        err.print(f"dashboard: {server.url}  (Prometheus: {server.url}metrics)", highlight=False)
        ok = False
        try:
            results = _run_with_progress(
                cfg, resume, verbose, force, run_simulation, also=metrics.observe
            )
            ok = True
            return results
        finally:
            metrics.finish(ok=ok)


def _run_with_progress(
    cfg: RunConfig,
    resume: bool,
    verbose: bool,
    force: bool,
    run: Callable[..., dict[str, Any]],
    also: ProgressFn | None = None,
) -> dict[str, Any]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from server.run import RoundUpdate

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    privacy = f"DP-SGD, epsilon {cfg.target_epsilon:g}" if cfg.dp else "no DP"
    err.print(f"medfed: {cfg.strategy}, {cfg.rounds} rounds, {privacy}; writing {cfg.out}")
    with Progress(
        TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
        console=err, transient=False,
    ) as progress:
        task = progress.add_task("rounds", total=cfg.rounds, status="starting sites...")
        reported: set[tuple[str, str, str, str]] = set()

        def on_round(update: RoundUpdate) -> None:
            central = update.entry.get("central") or {}
            fed = update.entry["federated"]["evaluate"]
            status = ""
            for key in HEADLINE_METRICS:
                value = central.get(key, fed.get(key))
                if isinstance(value, float):
                    status = f"{key} {value:.3f}"
                    break
            failures = [f for f in update.entry["failures"] if f.get("site") != "*"]
            status += f", {len(update.entry['participants'])} sites"
            status += f", {len(failures)} failed" if failures else ""
            progress.update(task, completed=update.round, status=status)
            for f in failures:  # each site's reason once, above the bar, not every round
                said = (f["site"], f["stage"], f["kind"], f["reason"])
                if said not in reported:
                    reported.add(said)
                    progress.console.print(
                        f"round {update.round}: site {f['site']} {f['stage']} {f['kind']}: "
                        f"{f['reason']}", highlight=False, markup=False,
                    )
            if also is not None:
                also(update)

        return run(cfg, resume=resume, on_round=on_round, quiet=not verbose, force=force)
