"""Hooks in Flower's ClientApp runtime, so that a site checks every app before Flower installs it.

What is approved, and the refusal texts, are client.approval's; this module only hooks the
check into Flower. Flower's SuperNode (through its SuperExec) starts every ClientApp task as the
command `flwr-clientapp`, found on PATH (`SubprocessExecutor.launch` runs
`TASK_TYPE_TO_COMMAND[spec.task_type]`); that process pulls one task, installs the app bundle
(FAB), loads the app, runs it and pushes the reply (`run_clientapp` in
flwr/supernode/runtime/run_clientapp.py). An exception on the way becomes the error reply, its
text included, that the aggregator receives.

`guard_clientapp_runtime` replaces three names in that module's namespace:
- `pull_task_input`, wrapped to keep the task's run, context and message for the check;
- `install_from_fab`, wrapped to check first (the message is pulled by then, so a refusal
  becomes Flower's error reply), and to unpack a bundle only once: for every message Flower
  unpacks the bundle into a temporary folder and verifies each file's hash, then keeps the
  folder it installed before (`validate_and_install`): 0.2 to 0.7 s of each message on 2 busy
  cores. Once installed, the folder holds a mark with the bundle's full SHA-256, and the next
  task of that bundle skips the unpacking;
- `get_load_client_app_fn`, wrapped so that a ClientApp whose bundle was not checked in this
  process is never loaded (fail closed).

`prompt_pulls` (a speed-up, called by client.approval after the guard) replaces a fourth:
`pull_and_inflate_object_from_tree`, with Flower's function retrying an object the SuperNode
does not hold yet after `RETRY_S` instead of 1 s, doubling to at most `RETRY_CAP_S` instead of
10 s. A ClientApp started promptly (client.launchpad) often asks before the SuperNode finished
receiving the message, and Flower's first retry then cost a whole second, the second three.

Why not Flower's own `--trusted-entities` (SuperNode entity verification, flwrlabs/flower#6084):
in Flower 1.41 it accepts only bundles that Flower's platform marked `valid_license`; the
open-source SuperLink sends none, so every app is refused.

Gate: security-relevant, so on a Flower release it was not checked against no app runs.
tests/common/flower_compat/test_clientapp_runtime.py fails when Flower's code around the three
names changes.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.flower_compat import FlowerVersionError, Gate

GATE = Gate(
    patch="app approval at a site (client/approval.py)",
    flower_code="flwr/supernode/runtime/run_clientapp.py (run_clientapp) and "
                "flwr/supercore/superexec/executor/subprocess_executor.py (launch)",
    test="tests/common/flower_compat/test_clientapp_runtime.py",
)
HOOKED = ("pull_task_input", "install_from_fab", "get_load_client_app_fn")
CLIENTAPP_COMMAND = "flwr-clientapp"  # the command SuperExec starts for a ClientApp task


@dataclass(frozen=True)
class PulledTask:
    """The task Flower pulled for this process, as the check needs it."""

    message: Any  # flwr.app.Message
    context: Any  # flwr.app.Context
    run: Any  # flwr.supercore.run.Run

    @property
    def run_id(self) -> int:
        """The run the task belongs to."""
        return int(self.run.run_id)

    @property
    def overrides(self) -> dict[str, Any]:
        """The run config the operator submitted (`flwr run --run-config`)."""
        return dict(self.run.override_config)

    @property
    def app_config(self) -> dict[str, Any]:
        """The run config the SuperNode prepared for the app (its Context's)."""
        return dict(self.context.run_config)

    @property
    def config_records(self) -> Any:
        """The message's config records (none when it carries an error)."""
        return self.message.content.config_records if self.message.has_content() else {}

    def run_config_for(self, fab_content: bytes) -> dict[str, Any]:
        """The run config the app gets from these bundle bytes, computed as the SuperNode does."""
        from flwr.common.config import get_fused_config_from_fab

        return dict(get_fused_config_from_fab(fab_content, self.run))


# check(fab_file, task) returns the SHA-256 it approved, or raises to refuse; task is None when
# no task was pulled in this process. refuse_load(fab_id, version, hash) builds the exception for
# a loader asked for a bundle this process did not check.
Check = Callable[[Any, PulledTask | None], str]
RefuseLoad = Callable[[str, str, str], Exception]


def guard_clientapp_runtime(check: Check, refuse_load: RefuseLoad) -> None:
    """Make Flower's ClientApp runtime, in this process, install and load only checked bundles.

    Raises FlowerVersionError when the installed Flower is not one this was checked against, or
    lacks the names it hooks.
    """
    GATE.require()
    from flwr.supernode.runtime import run_clientapp as runtime

    missing = [name for name in HOOKED if not callable(getattr(runtime, name, None))]
    if missing:
        raise FlowerVersionError(
            f"flwr.supernode.runtime.run_clientapp has no {', '.join(missing)}: "
            f"{GATE.problem()}"
        )
    pull_task_input: Callable[..., Any] = runtime.pull_task_input
    install_from_fab: Callable[..., Any] = runtime.install_from_fab
    get_load_client_app_fn: Callable[..., Any] = runtime.get_load_client_app_fn
    checked: set[str] = set()
    pulled: list[PulledTask] = []

    def recording_pull(*args: Any, **kwargs: Any) -> Any:
        message, context, run, fab = pull_task_input(*args, **kwargs)
        pulled[:] = [PulledTask(message, context, run)]
        return message, context, run, fab

    def checked_install(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        sha256 = check(fab_file, pulled[0] if pulled else None)
        checked.add(sha256)
        folder = _install_folder(pulled[0].run, sha256) if pulled else None
        if folder is not None and _installed(folder) == sha256:
            return folder  # this bundle, installed by an earlier task: not unpacked again
        result = install_from_fab(fab_file, *args, **kwargs)
        if folder is not None and folder.is_dir():
            (folder / INSTALLED_MARK).write_text(sha256)
        return result

    def checked_loader(*args: Any, **kwargs: Any) -> Callable[[str, str, str], Any]:
        load = get_load_client_app_fn(*args, **kwargs)

        def load_checked(fab_id: str, fab_version: str, fab_hash: str) -> Any:
            if fab_hash not in checked:
                raise refuse_load(fab_id, fab_version, fab_hash)
            return load(fab_id, fab_version, fab_hash)

        return load_checked

    runtime.pull_task_input = recording_pull
    runtime.install_from_fab = checked_install
    runtime.get_load_client_app_fn = checked_loader


RETRY_S, RETRY_CAP_S = 0.02, 0.5


def prompt_pulls() -> None:
    """Retry a message object the SuperNode does not hold yet within RETRY_S, not 1 s."""
    GATE.require()
    from flwr.supernode.runtime import run_clientapp as runtime

    runtime.pull_and_inflate_object_from_tree = functools.partial(
        runtime.pull_and_inflate_object_from_tree, initial_backoff=RETRY_S,
        backoff_cap=RETRY_CAP_S,
    )


# written into an app's install folder once Flower installed a bundle there: its full SHA-256
INSTALLED_MARK = ".medfed-installed"


def _install_folder(run: Any, sha256: str) -> Path | None:
    """Where Flower installs this run's bundle (`get_project_dir`), or None if it cannot say."""
    from flwr.common.config import get_project_dir

    try:
        return Path(get_project_dir(run.fab_id, run.fab_version, sha256))
    except (ValueError, AttributeError):
        return None


def _installed(folder: Path) -> str | None:
    try:
        return (folder / INSTALLED_MARK).read_text().strip()
    except OSError:
        return None


def task_commands() -> list[str]:
    """Every command Flower's SuperExec may start for a task (ClientApp, AgentApp, ...)."""
    GATE.require()
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    return sorted(set(TASK_TYPE_TO_COMMAND.values()))


def run_flower_clientapp(args: list[str]) -> None:
    """Run Flower's own `flwr-clientapp ARGS...` in this process (after the guard)."""
    from flwr.supernode.cli import flwr_clientapp

    sys.argv = [CLIENTAPP_COMMAND, *args]
    flwr_clientapp()
