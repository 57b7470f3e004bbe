"""`medfed provision`: a federation's CA and every party's kit; adding, revoking sites."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medfed.console import (
    EXIT_BAD_INPUT,
    fail,
    guard,
    out,
)

provision_app = typer.Typer(
    help="Issue a federation's CA, the aggregator's TLS certificate, one key per hospital and "
    "an operator client certificate, as kits: KITS/server, KITS/sites/<name>, KITS/operator.",
    no_args_is_help=False,
)

KitsOpt = Annotated[Path, typer.Option("--kits", help="The folder `medfed provision` wrote.")]


@provision_app.callback(invoke_without_command=True)
def provision(
    ctx: typer.Context,
    project: Annotated[str | None, typer.Option(help="The federation's name.")] = None,
    server_host: Annotated[
        str | None,
        typer.Option(help="Aggregator host names or IPs, comma-separated (all go in its "
                     "certificate; sites connect to the first)."),
    ] = None,
    sites: Annotated[str, typer.Option(help="Hospital site names, comma-separated.")] = "",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder to write kits to.")] = None,
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="The port the aggregator listens on (HTTPS).")
    ] = 9092,
    fleet_address: Annotated[
        str, typer.Option(help="HOST:PORT sites connect to, when not the first --server-host "
                          "and --port (e.g. behind an ingress).")
    ] = "",
    control_address: Annotated[
        str, typer.Option(help="HOST:PORT operators connect to.",
                          show_default="the fleet address")
    ] = "",
    force: Annotated[bool, typer.Option(help="Re-issue everything in an existing --out.")] = False,
    operator: Annotated[
        str, typer.Option(help="The first operator's name (its certificate's CN).")
    ] = "operator",
) -> None:
    """Provision a new federation (later: add-site, revoke-site, add-operator, revoke-operator)."""
    if ctx.invoked_subcommand is not None:
        return
    if not (project and server_host and out_dir):
        raise fail("--project, --server-host and --out are required", EXIT_BAD_INPUT)
    from server.provision import provision as write_kits

    summary = guard(
        lambda: write_kits(
            out_dir, project=project, server_hosts=server_host.split(","),
            sites=sites.split(","), port=port, fleet_address=fleet_address,
            control_address=control_address, force=force, operator=operator,
        )
    )
    table = Table("kit", "folder", "hand it to", title=f"Kits for {project}")
    table.add_row("server", str(summary.server), "the aggregator (`medfed server --kit`)")
    for name, folder in summary.sites.items():
        table.add_row(f"site {name}", str(folder), f"hospital {name} (`medfed site --kit`)")
    table.add_row(
        f"operator {operator}", str(summary.operator), "whoever submits runs (`medfed run --kit`)"
    )
    out.print(table)
    out.print(
        f"sites connect to {summary.fleet}, the operator to {summary.control}. "
        f"Keep {out_dir}/ca/ca.key offline: "
        "it signs the aggregator's and the operators' certificates. Send each kit over a secure "
        "channel; private keys are mode 0600 and no kit holds another party's key."
    )


@provision_app.command("add-site")
def add_site(
    name: Annotated[str, typer.Argument(help="The new hospital's site name.")],
    kits: KitsOpt,
) -> None:
    """Issue one more hospital's kit; no other key or kit changes."""
    from server.provision import add_site as issue

    folder, superlink = guard(lambda: issue(kits, name))
    out.print(f"site {name}: kit in {folder} (connects to {superlink})")
    out.print(
        "A running `medfed server` registers it within seconds once it reads the updated "
        f"server kit ({kits / 'server'}); on Kubernetes, update the server kit Secret."
    )


@provision_app.command("revoke-site")
def revoke_site(
    name: Annotated[str, typer.Argument(help="The site to withdraw.")],
    kits: KitsOpt,
) -> None:
    """Withdraw a hospital: its key is removed from the server kit and its kit deleted."""
    from server.provision import revoke_site as revoke

    guard(lambda: revoke(kits, name))
    out.print(
        f"site {name} revoked; a running `medfed server` unregisters its node within seconds "
        "and the site's next connection is refused."
    )


@provision_app.command("add-operator")
def add_operator(
    name: Annotated[str, typer.Argument(help="The new operator's name (certificate CN).")],
    kits: KitsOpt,
) -> None:
    """Issue one more operator's client certificate and kit (KITS/operators/NAME)."""
    from server.provision import add_operator as issue

    folder, control = guard(lambda: issue(kits, name))
    out.print(f"operator {name}: kit in {folder} (Control API at {control})", highlight=False)
    out.print(
        "Hand it over a secure channel: it holds the operator's private key (operator.key). "
        f"If the server kit predated operator certificates, copy {kits / 'server'} to the "
        "aggregator again (on Kubernetes, update its Secrets)."
    )


@provision_app.command("revoke-operator")
def revoke_operator(
    name: Annotated[str, typer.Argument(help="The operator to withdraw.")],
    kits: KitsOpt,
) -> None:
    """Revoke an operator's certificate; the aggregator refuses it within seconds."""
    from server.provision import revoke_operator as revoke

    guard(lambda: revoke(kits, name))
    out.print(
        f"operator {name} revoked: {kits / 'server' / 'operators.crl'} lists its certificate. "
        "A running `medfed server` reading this server kit refuses it within seconds; copy the "
        "file to the aggregator if its kit is elsewhere (on Kubernetes: the server kit and "
        "operator CA Secrets, k8s/README.md)."
    )
