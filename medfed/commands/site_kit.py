"""`medfed site approve`, `apps`, `policy`, `trust-operator` ...: the edits of a site's kit."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from medfed.console import (
    EXIT_BAD_INPUT,
    fail,
    guard,
    out,
)

if TYPE_CHECKING:
    from common.apps import AppBundle


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


def app_hash(
    app_dir: Annotated[
        Path, typer.Argument(help="A Flower App folder.", show_default="the working directory")
    ] = Path("."),
) -> None:
    """Print the FAB hash of the bundle `flwr run APP_DIR` would submit (what sites approve)."""
    bundle = _bundle_of(app_dir)
    out.print(f"{bundle.sha256}  {bundle.label}", highlight=False)


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

    from common.kit import SiteKit
    from common.kit_edits import set_policy
    from common.policy import check_max_epsilon, check_names
    from common.registry import STRATEGIES, TASKS

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
