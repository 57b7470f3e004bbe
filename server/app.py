"""The ServerApp: the aggregator side of a medfed run, on Flower's Message API."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.exporter import MetricsSettings, serve_metrics
from server.run import ProgressFn, run_federation

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
    Without it (`flwr run .`), the run config's `metrics-port` (0: off) and `metrics-host` start
    the Prometheus exporter and dashboard for the length of the run.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is not None:
            run_federation(grid, cfg, site_dirs=site_dirs, resume=resume, on_round=on_round)
            return
        settings, values = MetricsSettings.split_run_config(context.run_config)
        run_cfg = RunConfig.from_mapping(values)
        with serve_metrics(settings, flag="metrics-port") as server:
            if server is None:
                run_federation(grid, run_cfg, site_dirs=site_dirs, resume=resume)
                return
            server.metrics.start_run(
                run_id=run_cfg.run_key or str(context.run_id), task=run_cfg.task,
                strategy=run_cfg.strategy, total_rounds=run_cfg.rounds, dp=run_cfg.dp,
                target_epsilon=run_cfg.target_epsilon,
            )
            flwr_log.info("medfed dashboard: %s (Prometheus: %smetrics)", server.url, server.url)
            ok = False
            try:
                run_federation(
                    grid, run_cfg, site_dirs=site_dirs, resume=resume,
                    on_round=server.metrics.observe,
                )
                ok = True
            finally:
                server.metrics.finish(ok=ok)

    return app


# Entry point for `flwr run .` ([tool.flwr.app.components]).
app = make_server_app()
