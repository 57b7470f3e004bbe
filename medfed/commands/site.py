"""`medfed site`: a hospital's site joins the federation; its subcommands are registered here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medfed import options as opt
from medfed.commands import site_kit, site_state
from medfed.console import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_REFUSED,
    configure_logging,
    err,
    fail,
    guard,
    out,
)

site_app = typer.Typer(help="Run this hospital's site (a Flower SuperNode) from its kit.")


@site_app.callback(invoke_without_command=True)
def site(
    ctx: typer.Context,
    kit: Annotated[Path | None, typer.Option(help="This site's kit (KITS/sites/<name>).")] = None,
    data: Annotated[
        Path | None, typer.Option(help="The site's image folder (with labels.csv).")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state", help="The site's own state (privacy ledger).",
                     show_default="~/.medfed/sites/<name>"),
    ] = None,
    runtime_port: Annotated[
        int, typer.Option(min=1, max=65535, help="Local port of the SuperNode's runtime API "
                          "(one per site on a shared machine).")
    ] = 9094,
    health_port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="gRPC health port (off if not set).")
    ] = None,
    metrics_port: Annotated[
        int, typer.Option(min=0, max=65535, help="The site's Prometheus /metrics (training "
                          "progress, privacy spent, GPU); 0 turns it off.")
    ] = 9401,
    metrics_host: Annotated[str, typer.Option(help="Address of /metrics.")] = "127.0.0.1",
    budget_epsilon: Annotated[
        float | None,
        typer.Option(help="This dataset's privacy budget over all runs.",
                     show_default="the kit's budget-epsilon, else none",
                     callback=opt.budget_flag),
    ] = None,
    ledger_dir: opt.LedgerDir = None,
    poll_interval: Annotated[
        float, typer.Option(min=0.05, max=10.0, help="Longest wait, in seconds, of an idle site "
                            "between asking the aggregator for its next message (Flower's own: "
                            "3). Right after a message the site asks again within 0.25 s, "
                            "backing off to this. Each ask costs the aggregator a few database "
                            "statements: with hundreds of sites, raise it.")
    ] = 2.0,
) -> None:
    """Check the site's data, then join the federation and train when the aggregator asks."""
    if ctx.invoked_subcommand is not None:
        return
    if kit is None or data is None:
        raise fail("--kit and --data are required", EXIT_BAD_INPUT)
    from common.flower_compat import FlowerVersionError, clientapp_runtime

    try:  # before anything waits: the site's app approval hooks into this Flower's internals
        clientapp_runtime.GATE.require()
    except FlowerVersionError as exc:
        raise fail(f"medfed site cannot run here: {exc}", EXIT_FAILED) from None
    from client.supernode import (
        SiteProcess,
        SiteRefused,
        SiteSettings,
        check_node_config_value,
        check_site_ports,
    )
    from common.data import Preprocess, check_site
    from common.kit import SiteKit

    configure_logging()
    site_kit = guard(lambda: SiteKit.load(kit))
    guard(lambda: check_site_ports(
        runtime_port=runtime_port, health_port=health_port, metrics_host=metrics_host,
        metrics_port=metrics_port,
    ))
    guard(lambda: check_node_config_value(data, "--data"))
    guard(lambda: check_node_config_value(site_kit.private_key, "--kit"))  # signs the audit trail
    card = guard(lambda: check_site(data, Preprocess()))
    if not card.usable:
        typer.echo(card.to_text())
        raise fail(
            f"{data}: the site's data is not usable (see above); fix it and run "
            f"`medfed check-data {data}` until it passes", EXIT_BAD_INPUT,
        )
    state = state_dir or Path.home() / ".medfed" / "sites" / site_kit.site
    guard(lambda: check_node_config_value(state, "--state"))
    out.print(
        f"site {site_kit.site}: {card.readable_rows} readable images; joining "
        f"{site_kit.superlink}", highlight=False,
    )
    if site_kit.approved_apps:
        approved = ", ".join(
            f"{a.app or 'app'} ({a.fab_sha256[:12]})" for a in site_kit.approved_apps
        )
        out.print(f"approved apps: {approved}; any other app is refused", highlight=False)
    else:
        err.print(
            f"[bold yellow]warning:[/] {kit} approves no app, so every run is refused here "
            f"until the hospital approves one: `medfed site approve --kit {kit} --app APP_DIR` "
            "(or --fab-hash HASH, as `medfed run` prints it)", highlight=False,
        )
    out.print("run policy: " + "; ".join(site_kit.policy.describe()), highlight=False)
    if not site_kit.operators:
        err.print(
            f"[bold yellow]warning:[/] {kit} trusts no operator, so every run is refused here: "
            f"`medfed site trust-operator --kit {kit} --name NAME --public-key FILE`",
            highlight=False,
        )
    budget = budget_epsilon if budget_epsilon is not None else site_kit.budget_epsilon
    if budget is not None:
        from client.ledger import PrivacyLedger

        spent = guard(lambda: PrivacyLedger(data, ledger_dir).read().spent())
        out.print(f"privacy budget: epsilon {spent:.3f} of {budget:g} spent on this dataset")
    process = SiteProcess(
        SiteSettings(
            site_kit, data, state, runtime_port=runtime_port, health_port=health_port,
            budget_epsilon=budget, ledger_dir=ledger_dir, poll_interval=poll_interval,
        )
    )
    stop_metrics = None
    if metrics_port:
        from client.site_metrics import SiteCollector, serve_site_metrics

        def running() -> bool:
            return process.process is not None and process.process.poll() is None

        collector = SiteCollector(site_kit.site, state, running=running)
        stop_metrics = guard(
            lambda: serve_site_metrics(collector, host=metrics_host, port=metrics_port)
        )
        out.print(f"site metrics: http://{metrics_host}:{metrics_port}/metrics", highlight=False)
    process.install_signal_handlers()
    try:
        code = process.run()
    except SiteRefused as exc:
        raise fail(str(exc), EXIT_REFUSED) from None
    finally:
        process.stop()
        if stop_metrics is not None:
            stop_metrics()
    raise typer.Exit(code)


# the kit's and the state's subcommands, in the order `medfed site --help` lists them
site_app.command("approve")(site_kit.approve)
site_app.command("revoke-app")(site_kit.revoke_app_command)
site_app.command("apps")(site_kit.apps)
site_app.command("app-hash")(site_kit.app_hash)
site_app.command("policy")(site_kit.policy)
site_app.command("trust-operator")(site_kit.trust_operator_command)
site_app.command("distrust-operator")(site_kit.distrust_operator_command)
site_app.command("budget")(site_state.budget)
site_app.command("audit")(site_state.audit)
