"""The ServerApp: the aggregator side of a medfed run, on Flower's Message API."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.run import ProgressFn, run_federation


def make_server_app(
    cfg: RunConfig | None = None,
    *,
    site_dirs: Sequence[Path] = (),
    resume: bool = False,
    on_round: ProgressFn | None = None,
) -> ServerApp:
    """Build the ServerApp; without `cfg` it reads the run config Flower passes in `context`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else RunConfig.from_mapping(context.run_config)
        run_federation(grid, run_cfg, site_dirs=site_dirs, resume=resume, on_round=on_round)

    return app


# Entry point for `flwr run .` ([tool.flwr.app.components]).
app = make_server_app()
