"""The `medfed` command line: one module per command in medfed.commands, assembled here.

Exit codes are documented in medfed.console (0 ok, 1 failed, 2 bad input, 3 refused).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from medfed.commands import data, model, provision, runs, server, simulate, site
from medfed.console import EXIT_BAD_INPUT, EXIT_OK, state

__all__ = ["EXIT_BAD_INPUT", "EXIT_OK", "app", "main"]

app = typer.Typer(
    name="medfed",
    help=(
        "Federated learning for medical imaging: train one model across hospitals without "
        "moving images. Exit codes: 0 ok, 1 run failed, 2 bad input or usage, "
        "3 refused by policy."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# in the order `medfed --help` lists them
app.add_typer(provision.provision_app, name="provision")
app.add_typer(site.site_app, name="site")
app.command()(server.server)
app.command("run")(runs.run)
app.command()(runs.runs)
app.command()(runs.stop)
app.command()(data.synth)
app.command("check-data")(data.check_data)
app.command()(simulate.simulate)
app.command()(simulate.report)
app.command()(model.central)
app.command()(model.sample)
app.command()(model.predict)
app.command("audit-privacy")(model.audit_privacy)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option(help="Show full tracebacks on errors.")] = False,
) -> None:
    state["debug"] = debug


def main() -> None:
    """Entry point of the `medfed` script."""
    try:
        app()
    except SystemExit as exc:
        # click reports usage errors with exit code 2 already; keep codes as they are.
        sys.exit(exc.code)
