"""Deployment commands: `medfed provision`, `server`, `site`, `run`, `runs`, `stop`.

operator:  medfed provision --project P --server-host fl.example.org --sites a,b --out KITS
aggregator: medfed server --kit KITS/server --state /var/lib/medfed
hospital:  medfed site --kit KITS/sites/a --data /srv/imaging/site
operator:  medfed run --kit KITS/operator --out runs/first --rounds 10
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from common.config import RunConfig
from medfed import options as opt
from medfed.console import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    err,
    fail,
    given,
    guard,
    out,
    print_results,
)

if TYPE_CHECKING:
    from common.apps import AppBundle

provision_app = typer.Typer(
    help="Issue a federation's CA, the aggregator's TLS certificate, one key per hospital and "
    "an operator client certificate, as kits: KITS/server, KITS/sites/<name>, KITS/operator.",
    no_args_is_help=False,
)
site_app = typer.Typer(help="Run this hospital's site (a Flower SuperNode) from its kit.")

KitsOpt = Annotated[Path, typer.Option("--kits", help="The folder `medfed provision` wrote.")]


def _logging() -> None:
    from common import logs

    logs.configure()


# --- provision ---------------------------------------------------------------------------------


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


# --- server ------------------------------------------------------------------------------------


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

    _logging()
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


# --- site --------------------------------------------------------------------------------------


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
) -> None:
    """Check the site's data, then join the federation and train when the aggregator asks."""
    if ctx.invoked_subcommand is not None:
        return
    if kit is None or data is None:
        raise fail("--kit and --data are required", EXIT_BAD_INPUT)
    from client.supernode import (
        SiteProcess,
        SiteRefused,
        SiteSettings,
        check_node_config_value,
        check_site_ports,
    )
    from common.data import Preprocess, check_site
    from common.kit import SiteKit

    _logging()
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
            budget_epsilon=budget, ledger_dir=ledger_dir,
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


AppKitOpt = Annotated[Path, typer.Option("--kit", help="This site's kit (KITS/sites/<name>).")]
FabHashOpt = Annotated[
    str | None,
    typer.Option("--fab-hash", help="The app bundle's SHA-256 (64 hex digits), as `medfed run` "
                 "prints it."),
]


def _kit_written(action: Callable[[], Any], kit: Path) -> Any:
    """Run a kit edit; a read-only kit (a Kubernetes Secret) gets a message saying what to do."""
    try:
        return action()
    except PermissionError as exc:
        raise fail(
            f"{kit}: cannot write the kit ({exc.strerror}); edit the copy the kit was mounted "
            "from (on Kubernetes: the site kit Secret, see k8s/README.md) and apply it again",
            EXIT_BAD_INPUT,
        ) from None
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise fail(
                f"{kit}: the kit is on a read-only file system; edit the copy it was mounted "
                "from (on Kubernetes: the site kit Secret) and apply it again", EXIT_BAD_INPUT,
            ) from None
        raise


def _bundle_of(app_dir: Path) -> AppBundle:
    from common.apps import build_app_bundle

    return guard(lambda: build_app_bundle(app_dir))[1]


@site_app.command("approve")
def approve(
    kit: AppKitOpt,
    fab_hash: FabHashOpt = None,
    app_dir: Annotated[
        Path | None,
        typer.Option("--app", help="A Flower App folder: approve the bundle `flwr run` (and "
                     "`medfed run --app`) builds from it, byte for byte."),
    ] = None,
    note: Annotated[str, typer.Option(help="Why, or who reviewed it (kept in the kit).")] = "",
) -> None:
    """Approve one app version (its FAB hash) to run at this site."""
    from common.apps import check_fab_hash
    from common.kit import SiteKit
    from common.kit_edits import approve_app

    if (fab_hash is None) == (app_dir is None):
        raise fail("give exactly one of --fab-hash HASH or --app APP_DIR", EXIT_BAD_INPUT)
    site_kit = guard(lambda: SiteKit.load(kit, check_permissions=False))
    label = ""
    if app_dir is not None:
        bundle = _bundle_of(app_dir)
        digest, label = bundle.sha256, bundle.label
    else:
        digest = guard(lambda: check_fab_hash(fab_hash or ""))
    added = guard(lambda: _kit_written(lambda: approve_app(kit, digest, app=label, note=note), kit))
    what = f"{label} ({digest})" if label else digest
    if added:
        out.print(
            f"site {site_kit.site} approves {what}; a running `medfed site` applies it from the "
            "next round", highlight=False,
        )
    else:
        out.print(f"site {site_kit.site} already approves {what}", highlight=False)


@site_app.command("revoke-app")
def revoke_app_command(kit: AppKitOpt, fab_hash: FabHashOpt = None) -> None:
    """Withdraw an app version's approval; the site refuses it from the next round."""
    from common.kit import SiteKit
    from common.kit_edits import revoke_app

    if fab_hash is None:
        raise fail("--fab-hash is required (`medfed site apps --kit KIT` lists them)",
                   EXIT_BAD_INPUT)
    site_kit = guard(lambda: SiteKit.load(kit, check_permissions=False))
    entry = guard(lambda: _kit_written(lambda: revoke_app(kit, fab_hash), kit))
    out.print(
        f"site {site_kit.site} no longer approves {entry.app or 'app'} ({entry.fab_sha256})",
        highlight=False,
    )


@site_app.command("apps")
def apps(
    kit: AppKitOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the app versions this site approved."""
    from common.kit import SiteKit

    site_kit = guard(lambda: SiteKit.load(kit, check_permissions=False))
    if as_json:
        print(json.dumps([a.to_toml() for a in site_kit.approved_apps], indent=2))
        return
    if not site_kit.approved_apps:
        out.print(
            f"site {site_kit.site} approves no app: every run is refused "
            f"(`medfed site approve --kit {kit} --app APP_DIR | --fab-hash HASH`)",
            highlight=False,
        )
        return
    # one line per app, the hash whole: it is copied into `revoke-app` and compared by eye
    out.print(f"apps site {site_kit.site} runs (FAB sha256, app, approved at, note):",
              highlight=False)
    for entry in site_kit.approved_apps:
        fields = [entry.fab_sha256, entry.app or "-", entry.approved_at or "-", entry.note]
        out.print("  ".join(fields).rstrip(), highlight=False, markup=False)


@site_app.command("app-hash")
def app_hash(
    app_dir: Annotated[
        Path, typer.Argument(help="A Flower App folder.", show_default="the working directory")
    ] = Path("."),
) -> None:
    """Print the FAB hash of the bundle `flwr run APP_DIR` would submit (what sites approve)."""
    bundle = _bundle_of(app_dir)
    out.print(f"{bundle.sha256}  {bundle.label}", highlight=False)


@site_app.command("policy")
def policy(
    kit: AppKitOpt,
    require_dp: Annotated[
        bool | None,
        typer.Option("--require-dp/--allow-no-dp", help="Refuse runs without differential "
                     "privacy, or accept them. \\[default: unchanged; a new kit requires DP]"),
    ] = None,
    max_epsilon: Annotated[
        str | None,
        typer.Option(help="The largest target epsilon of one run (a number > 0), or `none`."),
    ] = None,
    tasks: Annotated[
        str | None, typer.Option(help="Allowed tasks, comma-separated, or `all`.")
    ] = None,
    strategies: Annotated[
        str | None, typer.Option(help="Allowed strategies, comma-separated, or `all`.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show this site's run policy and trusted operators; the flags change the policy."""
    from dataclasses import replace

    from common.config import STRATEGIES, TASKS
    from common.kit import SiteKit
    from common.kit_edits import set_policy
    from common.policy import check_max_epsilon, check_names

    site_kit = guard(lambda: SiteKit.load(kit, check_permissions=False))
    changes: dict[str, Any] = {}
    if require_dp is not None:
        changes["require_dp"] = require_dp
    if max_epsilon is not None:
        if max_epsilon.strip().lower() == "none":
            changes["max_epsilon"] = None
        else:
            try:
                number = float(max_epsilon)
            except ValueError:
                raise fail(f"--max-epsilon must be a number > 0 or `none`, got {max_epsilon!r}",
                           EXIT_BAD_INPUT) from None
            changes["max_epsilon"] = guard(lambda: check_max_epsilon(number))
    def allowed(value: str, known: tuple[str, ...], flag: str) -> tuple[str, ...]:
        if value.strip().lower() == "all":
            return ()
        return guard(lambda: check_names(value.split(","), known, flag))

    if tasks is not None:
        changes["tasks"] = allowed(tasks, TASKS, "--tasks")
    if strategies is not None:
        changes["strategies"] = allowed(strategies, STRATEGIES, "--strategies")
    if changes:
        updated = replace(site_kit.policy, **changes)
        guard(lambda: _kit_written(lambda: set_policy(kit, updated), kit))
        site_kit = guard(lambda: SiteKit.load(kit, check_permissions=False))
        out.print(f"site {site_kit.site}: run policy updated; a running `medfed site` applies "
                  "it from the next message", highlight=False)
    if as_json:
        print(json.dumps({"policy": site_kit.policy.to_toml(),
                          "operators": [o.name for o in site_kit.operators]}, indent=2))
        return
    out.print(f"site {site_kit.site} trains only runs signed by a trusted operator and within "
              "this policy:", highlight=False)
    for line in site_kit.policy.describe():
        out.print(f"  {line}", highlight=False)
    names = ", ".join(o.name for o in site_kit.operators)
    out.print(f"  trusted operators: {names or 'none (every run is refused)'}", highlight=False)


@site_app.command("trust-operator")
def trust_operator_command(
    kit: AppKitOpt,
    name: Annotated[str, typer.Option(help="The operator's name (its kit's `name`).")],
    public_key: Annotated[
        Path, typer.Option(help="The operator's public key (PEM, KITS/operator/operator.pub).")
    ],
) -> None:
    """Accept runs signed by this operator's key at this site."""
    from common.kit import SiteKit
    from common.kit_edits import trust_operator

    site_kit = guard(lambda: SiteKit.load(kit, check_permissions=False))
    try:
        pem = public_key.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"--public-key {public_key}: cannot read it ({exc})", EXIT_BAD_INPUT) from None
    try:
        added = _kit_written(lambda: trust_operator(kit, name, pem), kit)
    except ValueError as exc:
        raise fail(f"--name {name!r} / --public-key {public_key}: {exc}", EXIT_BAD_INPUT) from None
    verb = "now accepts" if added else "already accepts"
    out.print(f"site {site_kit.site} {verb} runs signed by operator {name}", highlight=False)


@site_app.command("distrust-operator")
def distrust_operator_command(
    kit: AppKitOpt,
    name: Annotated[str, typer.Option(help="The operator to stop trusting.")],
) -> None:
    """Refuse runs signed by this operator from the next message on."""
    from common.kit import SiteKit
    from common.kit_edits import distrust_operator

    site_kit = guard(lambda: SiteKit.load(kit, check_permissions=False))
    guard(lambda: _kit_written(lambda: distrust_operator(kit, name), kit))
    out.print(f"site {site_kit.site} no longer accepts runs signed by operator {name}",
              highlight=False)


@site_app.command("budget")
def budget(
    data: Annotated[Path, typer.Option(help="The site's image folder (the dataset).")],
    ledger_dir: opt.LedgerDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the privacy spent on a dataset over all runs, against its budget."""
    from client.ledger import PrivacyLedger

    ledger = guard(lambda: PrivacyLedger(data, ledger_dir))
    entry = guard(lambda: ledger.read().to_dict())
    if as_json:
        print(json.dumps(entry, indent=2))
        return
    budget_text = f"{entry['budget_epsilon']:g}" if entry["budget_epsilon"] else "none set"
    spent = entry["epsilon_spent"]
    spent_text = f"{spent:.3f}" if isinstance(spent, float | int) else "inf (trained without DP)"
    out.print(
        f"dataset {entry['dataset']} ({entry['images']} images, by content): epsilon "
        f"{spent_text} spent on its most-spent image (delta {entry['delta']:g}), "
        f"budget {budget_text}", highlight=False,
    )
    for run, steps in entry["runs"].items():
        shown = f"{steps} DP-SGD steps" if isinstance(steps, int) else steps
        out.print(f"  run {run}: {shown}", highlight=False)


@site_app.command("audit")
def audit(
    state_dir: Annotated[
        Path, typer.Option("--state", help="The site's state folder (as given to `medfed site`).")
    ],
    verify_chain: Annotated[
        bool, typer.Option("--verify", help="Check the trail: its hash chain, that it ends in "
                           "its signed head, and the head's key.")
    ] = False,
    witness: Annotated[
        Path | None,
        typer.Option("--witness", help="A run's results.json: with --verify, every audit head "
                     "the aggregator recorded for this site must be in the trail."),
    ] = None,
    site_name: Annotated[
        str | None,
        typer.Option("--site", help="The site's name in --witness \\[default: the --kit's "
                     "site, else the --state folder's name]."),
    ] = None,
    kit: Annotated[
        Path | None,
        typer.Option(help="This site's kit: with --verify, the head must be signed with its "
                     "key (site.pub)."),
    ] = None,
    last: Annotated[int, typer.Option(help="Show the last N entries.")] = 10,
) -> None:
    """Show what left this site (the audit trail), or verify that the trail is intact.

    With --verify, exit codes: 0 the trail is intact (or the folder is a site state that has
    sent no reply yet), 1 the trail was altered, cut, emptied, deleted or re-signed (the message
    says which), 2 --state is not a site's state folder, or --witness not a results.json that
    names the site.
    """
    from client.audit_state import TRAIL, NotSiteState, TrailAltered, verify_state

    path = state_dir / TRAIL
    if verify_chain:
        site_key = None
        if kit is not None:
            from common.kit import SiteKit

            site_kit = guard(lambda: SiteKit.load(kit, check_permissions=False))
            site_key = site_kit.public_key.read_text()
            site_name = site_name or site_kit.site
        try:
            report = verify_state(state_dir, site_key=site_key, witness=witness, site=site_name)
        except NotSiteState as exc:
            raise fail(str(exc), EXIT_BAD_INPUT) from None
        except TrailAltered as exc:
            raise fail(f"audit trail altered: {exc}", EXIT_FAILED) from None
        out.print(report.summary(state_dir), highlight=False)
        return
    if witness is not None or kit is not None:
        raise fail("--witness and --kit check the trail: use them with --verify", EXIT_BAD_INPUT)
    if not path.is_file():
        raise fail(f"{path}: no audit trail (nothing has left this site yet)", EXIT_BAD_INPUT)
    table = Table("seq", "time", "run", "round", "type", "bytes", "metrics", title=str(path))
    lines = path.read_text().splitlines()[-last:]
    for line in lines:
        entry = json.loads(line)
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in entry.get("metrics", {}).items())
        table.add_row(
            str(entry["seq"]), entry["time"], str(entry.get("run")), str(entry.get("round")),
            str(entry.get("message_type")), str(entry.get("bytes")), metrics,
        )
    out.print(table)


# --- operator ----------------------------------------------------------------------------------


def run(
    kit: Annotated[Path, typer.Option(help="The operator kit (KITS/operator).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder to write here.")],
    test_data: Annotated[
        str | None,
        typer.Option(help="Held-out folder ON THE AGGREGATOR for central evaluation (none: "
                     "the sites' federated evaluation is used).", show_default="none"),
    ] = None,
    task: opt.TaskOpt = None,
    model: opt.ModelOpt = None,
    channels: opt.Channels = None,
    init_encoder: opt.InitEncoder = None,
    encoder_lr_scale: opt.EncoderLrScale = None,
    spot_weight: opt.SpotWeight = None,
    num_classes: opt.NumClasses = None,
    rounds: opt.Rounds = None,
    strategy: opt.StrategyOpt = None,
    dp: opt.Dp = None,
    target_epsilon: opt.TargetEpsilon = None,
    delta: opt.Delta = None,
    max_grad_norm: opt.MaxGradNorm = None,
    local_epochs: opt.LocalEpochs = None,
    local_steps: opt.LocalSteps = None,
    logit_adjust: opt.LogitAdjust = None,
    augment: opt.Augment = None,
    cross_site: opt.CrossSite = None,
    net_width: opt.NetWidth = None,
    net_depth: opt.NetDepth = None,
    dims: opt.Dims = None,
    patch_size: opt.PatchSize = None,
    target_sensitivity: opt.TargetSensitivity = None,
    pretrained: opt.Pretrained = None,
    fraction_train: opt.FractionTrain = None,
    seed: opt.Seed = None,
    batch_size: opt.BatchSize = None,
    lr: opt.Lr = None,
    image_size: opt.ImageSize = None,
    min_sites: opt.MinSites = None,
    wait_timeout: opt.WaitTimeout = None,
    proximal_mu: opt.ProximalMu = None,
    device: opt.Device = None,
    screen_z: opt.ScreenZ = None,
    central_dp: opt.CentralDp = None,
    central_noise: opt.CentralNoise = None,
    clip_norm: opt.ClipNorm = None,
    secure_agg: opt.SecureAgg = None,
    secagg_shares: opt.SecaggShares = None,
    secagg_threshold: opt.SecaggThreshold = None,
    secagg_max_weight: opt.SecaggMaxWeight = None,
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
    values = given(
        test_data=test_data or "", task=task, model=model, channels=channels,
        init_encoder=str(init_encoder) if init_encoder else None,
        encoder_lr_scale=encoder_lr_scale, spot_weight=spot_weight, num_classes=num_classes,
        rounds=rounds, strategy=strategy, dp=dp,
        target_epsilon=target_epsilon, delta=delta, max_grad_norm=max_grad_norm,
        local_epochs=local_epochs, local_steps=local_steps, logit_adjust=logit_adjust,
        augment=augment, cross_site=cross_site, net_width=net_width, net_depth=net_depth,
        dims=dims, patch_size=patch_size,
        target_sensitivity=target_sensitivity,
        pretrained=str(pretrained) if pretrained else None,
        fraction_train=fraction_train, seed=seed,
        batch_size=batch_size, lr=lr, image_size=image_size, min_sites=min_sites,
        wait_timeout=wait_timeout, proximal_mu=proximal_mu, device=device, screen_z=screen_z,
        central_dp=central_dp, central_noise=central_noise, clip_norm=clip_norm,
        secure_agg=secure_agg, secagg_shares=secagg_shares, secagg_threshold=secagg_threshold,
        secagg_max_weight=secagg_max_weight,
    )
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
