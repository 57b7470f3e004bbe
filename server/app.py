"""The ServerApp: the aggregator side of a medfed run, on Flower's Message API."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server import artifacts
from server.cross_site import cross_site
from server.exporter import MetricsSettings, serve_metrics
from server.fingerprint import planned
from server.grids import PromptGrid
from server.model_card import CARD_HTML, CARD_JSON, write_model_card
from server.record import RunRecord
from server.run import ProgressFn, RoundUpdate, run_federation
from server.waiting import wait_for_sites

# Flower's logger: what `flwr log` shows of the ServerApp
flwr_log = logging.getLogger("flwr")


def make_server_app(
    cfg: RunConfig | None = None,
    *,
    site_dirs: Sequence[Path] = (),
    resume: bool = False,
    on_round: ProgressFn | None = None,
) -> ServerApp:
    """Build the ServerApp; without `cfg` it reads the run config Flower passes in `context`.

    With `cfg` (medfed simulate) the caller owns progress display and metrics (`on_round`).
    Under `medfed server` (deployment) the run writes to `STATE/runs/<run-id>`, where the
    server's own exporter watches it, and ends by streaming its result files to `medfed run`.
    Otherwise (`flwr run .`), the run config's `metrics-port` (0: off) and `metrics-host` start
    the Prometheus exporter and dashboard for the length of the run.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is None:  # deployed or `flwr run .`: replies are picked up as they arrive
            grid = PromptGrid(grid)
        def federate(run_cfg: RunConfig, on_round: ProgressFn | None = on_round) -> None:
            if cfg is None:  # deployed or `flwr run .`: sites connect when they can
                wait_for_sites(grid, min_sites=run_cfg.min_sites, timeout=run_cfg.wait_timeout,
                               say=flwr_log.info)
            plan = None
            if run_cfg.task == "segment" and not resume:  # a resumed run keeps its plan
                run_cfg, plan = planned(grid, run_cfg)
            record = run_federation(
                grid, run_cfg, site_dirs=site_dirs, resume=resume, on_round=on_round, plan=plan,
            )
            _close_run(grid, run_cfg, record)
            _log_outcome(record.outcome())

        if cfg is not None:
            federate(cfg)
            return
        settings, values = MetricsSettings.split_run_config(context.run_config)
        run_cfg = RunConfig.from_mapping(values)
        state = os.environ.get(artifacts.STATE_ENV)
        if state:
            run_dir = Path(state) / "runs" / str(context.run_id)
            # The operator's --out is a path on their machine, not here; sites-dir is
            # simulation-only.
            run_cfg = run_cfg.replace(out=str(run_dir), run_key=str(context.run_id), sites_dir="")
            flwr_log.info("medfed run %s: results in %s on the aggregator", context.run_id, run_dir)
            federate(run_cfg, _log_round)
            artifacts.publish(run_dir, artifacts.emit_to(flwr_log),
                              (*artifacts.FILES, CARD_JSON, CARD_HTML))
            return
        with serve_metrics(settings, flag="metrics-port") as server:
            if server is None:
                federate(run_cfg, _log_round)
                _log_results(run_cfg)
                return
            server.metrics.start_run(
                run_id=run_cfg.run_key or str(context.run_id), task=run_cfg.task,
                strategy=run_cfg.strategy, total_rounds=run_cfg.rounds, dp=run_cfg.dp,
                target_epsilon=run_cfg.target_epsilon,
            )
            flwr_log.info("medfed dashboard: %s (Prometheus: %smetrics)", server.url, server.url)
            ok = False
            try:
                federate(run_cfg, server.metrics.observe)
                ok = True
            finally:
                server.metrics.finish(ok=ok)
            _log_results(run_cfg)

    return app


def _close_run(grid: Grid, cfg: RunConfig, record: RunRecord) -> None:
    """The run's end: the final model at every site (results.json `cross_site`), the card.

    The run's result is already written (results.json, model.pt): whatever happens in the
    cross-site evaluation is recorded in its section and changes neither that nor the outcome.
    """
    skipped = None
    if not cfg.cross_site:
        skipped = "--no-cross-site: the run asked for no closing evaluation"
    else:
        try:
            record.cross_site = cross_site(grid, cfg, record)
        except Exception as exc:  # a site's failure is in `failed`; this is the aggregator's
            flwr_log.warning("medfed cross-site evaluation failed: %s: %s",
                             type(exc).__name__, exc)
            skipped = f"the evaluation failed ({type(exc).__name__}: {exc})"
    if skipped is not None:
        record.cross_site = {"model": "final", "round": record.last_round, "skipped": skipped}
    record.write_results()
    write_model_card(record.run_dir)


def _log_outcome(outcome: dict[str, Any]) -> None:
    """What `flwr log` and `medfed run` show of a run that ended without training its last round.

    `medfed run` takes its exit code from results.json's `outcome` (medfed.console).
    """
    if outcome["status"] == "trained":
        return
    flwr_log.warning("medfed run %s: %s", outcome["status"], outcome["reason"])
    for site, failure in sorted(outcome["sites"].items()):
        flwr_log.warning("medfed   %s: %s: %s", site, failure["kind"], failure["reason"])
    if not outcome["trained"]:
        flwr_log.warning("medfed: no round trained a site; no model.pt was written")


def _log_round(update: RoundUpdate) -> None:
    entry = update.entry
    final = entry.get("central") or entry["federated"]["evaluate"] or {}
    shown = ", ".join(f"{k} {v:.3f}" for k, v in final.items() if k in ("auc", "loss", "dice"))
    eps = [p["epsilon"] for p in entry.get("privacy", {}).values() if p.get("epsilon")]
    flwr_log.info(
        "medfed round %d/%d: %s; sites %d trained, %d failed%s; %.1fs",
        update.round, update.total_rounds, shown or "no evaluation",
        len(entry.get("participants", [])), len(entry.get("failures", [])),
        f"; max epsilon {max(eps):.2f}" if eps else "", float(entry.get("duration_s", 0.0)),
    )


def _log_results(cfg: RunConfig) -> None:
    # `flwr run .` prints no summary of its own: say where the run's files are (the ServerApp's
    # working directory is the local SuperLink's, so a relative --out is shown resolved)
    run_dir = Path(cfg.out).resolve()
    flwr_log.info(
        "medfed results: %s (results.json, metrics.png, model.pt, model_card.html; `medfed "
        "report %s` writes the HTML report)", run_dir, run_dir,
    )


# Entry point for `flwr run .` ([tool.flwr.app.components]).
app = make_server_app()
