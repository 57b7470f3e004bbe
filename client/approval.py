"""App approval: a site runs only the app versions its hospital approved in its kit.

Why outside the app: an app cannot be trusted to check itself, so the check sits in front of it.
Flower's SuperNode (through its SuperExec) starts every ClientApp task as the command
`flwr-clientapp`, found on PATH. `medfed site` puts a folder of launchers first on the
SuperNode's PATH (`write_launchers`); its `flwr-clientapp` runs `client.approval.main`, which
runs Flower's own `flwr-clientapp` entry point with one change: before Flower installs the
app bundle (FAB) it pulled, the SHA-256 of the bundle's bytes must be in the kit's approved
apps, or the task fails with `AppNotApproved`. Flower then replies to the aggregator with the
error's text, which says how to approve the app; the aggregator records it as a refusal.
In the same place the run itself is checked (client.policy): it must be signed by an operator
the kit trusts, its settings must meet the kit's policy, and the message must carry the signed
settings; otherwise the task fails with `RunRefused`, recorded as a refusal the same way.

Why not Flower's `--trusted-entities`: in Flower 1.41 it accepts only bundles that Flower's
platform marked `valid_license`; the open-source SuperLink sends none, so every app is refused.

The change to Flower is three names replaced in `flwr.supernode.runtime.run_clientapp`'s
namespace (flwr is pinned; tests/deploy/test_approval.py fails if Flower's code around them
changes): `pull_task_input`, wrapped to keep the task's run, context and message for the check;
`install_from_fab`, wrapped to check first (the message is pulled by then, so a refusal becomes
Flower's error reply); and `get_load_client_app_fn`, wrapped so that a ClientApp whose bundle
was not checked in this process is never loaded (fail closed).
The kit is read at every task, so approving or revoking an app applies from the next message on,
without restarting the site. Other task kinds (Flower's AgentApp, ...) are never run on a site.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client.policy import RunRefused, check_task, message_configs
from common.apps import APP_REFUSAL_MARK, AppBundle
from common.atomic import write_text
from common.kit import KitError, SiteKit
from common.policy import RUN_REFUSAL_MARK

CLIENTAPP_COMMAND = "flwr-clientapp"
LAUNCHER_DIR = "approval-bin"  # under the site's state folder


class AppNotApproved(RuntimeError):
    """The hospital did not approve this app version; the message says how to approve it."""


def refusal_text(site: str, bundle: AppBundle) -> str:
    """What the aggregator is told (no local path: the kit's location stays at the site)."""
    return (
        f"{APP_REFUSAL_MARK}: site {site} refuses {bundle.label} (FAB sha256 {bundle.sha256}): "
        "this hospital has not approved this app version. To approve it, the site's "
        f"administrator runs `medfed site approve --kit KIT --fab-hash {bundle.sha256}`"
    )


def check_bundle(kit_dir: Path, content: bytes) -> AppBundle:
    """The bundle, when the kit approves it; raises AppNotApproved otherwise.

    A kit that cannot be read approves nothing.
    """
    bundle = AppBundle.from_content(content)
    try:
        kit = SiteKit.load(kit_dir, check_permissions=False)
    except KitError as exc:
        raise AppNotApproved(
            f"{APP_REFUSAL_MARK}: the site's kit cannot be read, so no app is approved ({exc})"
        ) from None
    if not kit.approves(bundle.sha256):
        text = refusal_text(kit.site, bundle)
        print(f"medfed: {text.replace('--kit KIT', f'--kit {kit_dir}')}", file=sys.stderr)
        raise AppNotApproved(text)
    return bundle


def _config_records(message: Any) -> Any:
    return message.content.config_records if message.has_content() else {}


def install_check(kit_dir: Path) -> None:
    """Make Flower's ClientApp runtime check every bundle against the kit before installing it.

    Raises RuntimeError when Flower's runtime no longer has the names this relies on.
    """
    from flwr.common.config import get_fused_config_from_fab
    from flwr.supernode.runtime import run_clientapp as runtime

    for name in ("pull_task_input", "install_from_fab", "get_load_client_app_fn"):
        if not callable(getattr(runtime, name, None)):
            raise RuntimeError(
                f"flwr.supernode.runtime.run_clientapp has no {name}: this Flower version is not "
                "the one medfed's app approval was built for; no app runs until it is updated"
            )
    pull_task_input: Callable[..., Any] = runtime.pull_task_input
    install_from_fab: Callable[..., Any] = runtime.install_from_fab
    get_load_client_app_fn: Callable[..., Any] = runtime.get_load_client_app_fn
    checked: set[str] = set()
    pulled: dict[str, Any] = {}

    def recording_pull(*args: Any, **kwargs: Any) -> Any:
        message, context, run, fab = pull_task_input(*args, **kwargs)
        pulled.update(message=message, context=context, run=run)
        return message, context, run, fab

    def checked_install(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(fab_file, bytes):  # Flower passes fab.content; anything else: refuse
            raise AppNotApproved(f"{APP_REFUSAL_MARK}: the app bundle could not be checked")
        bundle = check_bundle(kit_dir, fab_file)
        if not pulled:
            raise RunRefused(f"{RUN_REFUSAL_MARK}: the run could not be checked (no task pulled)")
        run, context = pulled["run"], pulled["context"]
        # what the app will get as its run config, recomputed here from the bytes just checked
        # (the SuperNode computes the context's the same way; anything else is refused)
        fused = get_fused_config_from_fab(fab_file, run)
        check_task(
            kit_dir, fab_content=fab_file, overrides=dict(run.override_config),
            run_config=fused, run_id=int(run.run_id),
            configs=message_configs(_config_records(pulled["message"])),
            app_config=dict(context.run_config),
        )
        checked.add(bundle.sha256)
        return install_from_fab(fab_file, *args, **kwargs)

    def checked_loader(*args: Any, **kwargs: Any) -> Callable[[str, str, str], Any]:
        load = get_load_client_app_fn(*args, **kwargs)

        def load_checked(fab_id: str, fab_version: str, fab_hash: str) -> Any:
            if fab_hash not in checked:
                raise AppNotApproved(
                    f"{APP_REFUSAL_MARK}: app {fab_id} {fab_version} (FAB sha256 {fab_hash}) was "
                    "not checked against this site's approved apps; not loading it"
                )
            return load(fab_id, fab_version, fab_hash)

        return load_checked

    runtime.pull_task_input = recording_pull
    runtime.install_from_fab = checked_install
    runtime.get_load_client_app_fn = checked_loader


def main(argv: list[str] | None = None) -> None:
    """The checked ClientApp: `--kit KIT -- FLWR_CLIENTAPP_ARGS...` (the launcher's argv)."""
    args = sys.argv[1:] if argv is None else argv
    split = args.index("--") if "--" in args else len(args)
    parser = argparse.ArgumentParser(prog="medfed-checked-clientapp")
    parser.add_argument("--kit", type=Path, required=True, help="the site's kit folder")
    options = parser.parse_args(args[:split])
    install_check(options.kit)
    from flwr.supernode.cli import flwr_clientapp

    sys.argv = [CLIENTAPP_COMMAND, *args[split + 1 :]]
    flwr_clientapp()


def write_launchers(folder: Path, kit_dir: Path) -> Path:
    """Write the commands Flower's SuperExec may start, for the front of the SuperNode's PATH.

    `flwr-clientapp` runs the checked ClientApp; every other task command Flower knows refuses,
    since a site runs ClientApps only. Returns `folder`.
    """
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    folder.mkdir(parents=True, exist_ok=True)
    python = shlex.quote(sys.executable)
    kit = shlex.quote(str(kit_dir.resolve()))
    scripts = {
        command: (
            "echo 'medfed site: refusing to run a Flower task of another kind than a ClientApp "
            f"({command})' >&2\nexit 1\n"
        )
        for command in TASK_TYPE_TO_COMMAND.values()
    }
    # `-c`, not `-m client.approval`: the module then has one name, and so does its exception
    entry = shlex.quote("from client.approval import main; main()")
    scripts[CLIENTAPP_COMMAND] = f'exec {python} -c {entry} --kit {kit} -- "$@"\n'
    for command, body in scripts.items():
        write_text(
            folder / command,
            "#!/bin/sh\n# Written by `medfed site` (client/approval.py): Flower's SuperExec "
            "starts this.\n" + body,
            permissions=0o755,
        )
    return folder
