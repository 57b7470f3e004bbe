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

How the check is hooked into Flower's ClientApp runtime (and why not Flower's own
`--trusted-entities`) is common.flower_compat.clientapp_runtime's; this module decides what is
approved and what the aggregator is told.
The kit is read at every task, so approving or revoking an app applies from the next message on,
without restarting the site. Other task kinds (Flower's AgentApp, ...) are never run on a site.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from client.policy import RunRefused, check_task, message_configs
from common.apps import APP_REFUSAL_MARK, AppBundle
from common.atomic import write_text
from common.flower_compat import FlowerVersionError
from common.flower_compat.clientapp_runtime import (
    CLIENTAPP_COMMAND,
    PulledTask,
    guard_clientapp_runtime,
    prompt_pulls,
    run_flower_clientapp,
    task_commands,
)
from common.kit import KitError, SiteKit
from common.policy import RUN_REFUSAL_MARK

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


def check_install(kit_dir: Path, fab_file: Any, task: PulledTask | None) -> str:
    """The SHA-256 of `fab_file` when the kit approves the app and the task's run; else raise.

    Raises AppNotApproved (the app) or RunRefused (the run: client.policy.check_task).
    """
    if not isinstance(fab_file, bytes):  # Flower passes fab.content; anything else: refuse
        raise AppNotApproved(f"{APP_REFUSAL_MARK}: the app bundle could not be checked")
    bundle = check_bundle(kit_dir, fab_file)
    if task is None:
        raise RunRefused(f"{RUN_REFUSAL_MARK}: the run could not be checked (no task pulled)")
    # what the app will get as its run config, recomputed here from the bytes just checked
    # (the SuperNode computes the context's the same way; anything else is refused)
    check_task(
        kit_dir, fab_content=fab_file, overrides=task.overrides,
        run_config=task.run_config_for(fab_file), run_id=task.run_id,
        configs=message_configs(task.config_records), app_config=task.app_config,
    )
    return bundle.sha256


def refuse_unchecked(fab_id: str, fab_version: str, fab_hash: str) -> AppNotApproved:
    """The error for a ClientApp whose bundle this process never checked."""
    return AppNotApproved(
        f"{APP_REFUSAL_MARK}: app {fab_id} {fab_version} (FAB sha256 {fab_hash}) was "
        "not checked against this site's approved apps; not loading it"
    )


def install_check(kit_dir: Path) -> None:
    """Make Flower's ClientApp runtime check every bundle against the kit before installing it.

    Raises FlowerVersionError when the installed Flower is not one the hook was checked against.
    """
    guard_clientapp_runtime(
        lambda fab_file, task: check_install(kit_dir, fab_file, task), refuse_unchecked
    )


def main(argv: list[str] | None = None) -> None:
    """The checked ClientApp: `--kit KIT -- FLWR_CLIENTAPP_ARGS...` (the launcher's argv)."""
    args = sys.argv[1:] if argv is None else argv
    split = args.index("--") if "--" in args else len(args)
    parser = argparse.ArgumentParser(prog="medfed-checked-clientapp")
    parser.add_argument("--kit", type=Path, required=True, help="the site's kit folder")
    options = parser.parse_args(args[:split])
    try:
        install_check(options.kit)
        prompt_pulls()
    except FlowerVersionError as exc:  # no app runs: the site's log says why, not a traceback
        sys.exit(f"medfed site: {exc}")
    run_flower_clientapp(args[split + 1 :])


def write_launchers(folder: Path, kit_dir: Path, *, launchpad: Path | None = None) -> Path:
    """Write the commands Flower's SuperExec may start, for the front of the SuperNode's PATH.

    `flwr-clientapp` runs the checked ClientApp (`main`): in a child of the site's launchpad
    (client.launchpad) listening at `launchpad`, when one answers there, else itself. Every
    other task command Flower knows refuses, since a site runs ClientApps only. Returns `folder`.
    Raises FlowerVersionError when the installed Flower is not one the approval hook was checked
    against (the site does not start).
    """
    commands = task_commands()
    folder.mkdir(parents=True, exist_ok=True)
    python = shlex.quote(sys.executable)
    kit = shlex.quote(str(kit_dir.resolve()))
    scripts = {
        command: (
            "echo 'medfed site: refusing to run a Flower task of another kind than a ClientApp "
            f"({command})' >&2\nexit 1\n"
        )
        for command in commands
    }
    # `-c`, not `-m client.approval`: the module then has one name, and so does its exception
    entry = shlex.quote("from client.approval import main; main()")
    scripts[CLIENTAPP_COMMAND] = f'exec {python} -c {entry} --kit {kit} -- "$@"\n'
    if launchpad is not None:
        from client.launchpad import LAUNCHER

        pad = shlex.quote(str(launchpad))
        scripts[CLIENTAPP_COMMAND] = (
            f'exec {python} -S -c {shlex.quote(LAUNCHER)} --socket {pad} --kit {kit} -- "$@"\n'
        )
    for command, body in scripts.items():
        write_text(
            folder / command,
            "#!/bin/sh\n# Written by `medfed site` (client/approval.py): Flower's SuperExec "
            "starts this.\n" + body,
            permissions=0o755,
        )
    return folder
