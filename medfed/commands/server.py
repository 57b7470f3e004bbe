"""`medfed server`: the aggregator (Flower's SuperLink behind a gateway)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medfed.console import (
    EXIT_FAILED,
    EXIT_OK,
    configure_logging,
    guard,
    out,
)


def server(
    kit: Annotated[Path, typer.Option(help="The server kit (KITS/server).")],
    state_dir: Annotated[
        Path, typer.Option("--state", help="Where the SuperLink keeps runs and registered sites.")
    ] = Path("medfed-state"),
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="HTTPS port.", show_default="the kit's, 9092"),
    ] = None,
    health_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="gRPC health port.", show_default="the kit's, 9098"),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Dashboard and /metrics; 0 turns them off.",
                     show_default="the kit's, 9400"),
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Address of the dashboard.")] = "127.0.0.1",
) -> None:
    """Run the aggregator: Flower's SuperLink behind a gateway; Control API for operators only."""
    from common.server_kit import ServerKit
    from server.exporter import MetricsSettings
    from server.superlink import ServerProcess, ServerSettings
    from server.watch import RunWatcher

    configure_logging()
    server_kit = guard(lambda: ServerKit.load(kit))
    settings = ServerSettings(
        kit=server_kit, state=state_dir, host=host, port=port, health_port=health_port
    )
    metrics = guard(
        lambda: MetricsSettings(
            port=server_kit.metrics_port if metrics_port is None else metrics_port,
            host=metrics_host,
        )
    )
    process = ServerProcess(settings)
    watcher = RunWatcher(state_dir / "runs", metrics, sites=[s.name for s in server_kit.sites])
    process.install_signal_handlers()
    try:
        guard(watcher.start)
        guard(process.start)
        out.print(
            f"medfed server ready: https://{host}:{settings.link_port} "
            f"({len(server_kit.sites)} sites authorised, Control API for operator certificates "
            f"only, state in {state_dir})"
            + (f"; dashboard {watcher.url}" if watcher.url else ""),
            highlight=False,
        )
        code = process.run_until_stopped()
    finally:
        process.stop()
        watcher.stop()
    raise typer.Exit(EXIT_OK if code == 0 else EXIT_FAILED)
