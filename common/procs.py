"""Running Flower's programs from medfed, and stopping their process trees completely.

Flower's SuperLink and SuperNode start a SuperExec in a new session, which in turn starts the
ServerApp/ClientApp processes. Killing the SuperLink or SuperNode's process group therefore
leaves them behind, and a SuperNode that exits on its own (e.g. refused at activation) leaves its
SuperExec retrying forever, whatever its `--parent-pid` says. medfed finds them through /proc
(the process tree, and the `--parent-pid` Flower passes them) and ends them with their parent.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger("medfed")

PROC = Path("/proc")


def flower_environment() -> dict[str, str]:
    """The current environment, with this Python's scripts first on PATH.

    Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name, so
    they must be found even when medfed was started as `.venv/bin/medfed` without activating
    the virtual environment.
    """
    env = dict(os.environ)
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")])
    return env


def flower_executable(name: str) -> str:
    """A Flower console script from this Python's environment (then PATH)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return name


def on_stop_signals(what: str, stop: Callable[[], None]) -> None:
    """Call `stop` on SIGINT or SIGTERM (from a thread, so it may block), logging `what` stops."""

    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("received signal %s: stopping %s", signum, what)
        threading.Thread(target=stop, daemon=True).start()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def _ppids() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in PROC.glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            # the command name in parentheses may hold spaces; ppid is the second field after it
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return parents


def descendants(pid: int) -> list[int]:
    """Every living process below `pid` in the process tree (empty without /proc)."""
    parents = _ppids()
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        children = [p for p, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


def flower_orphans(parent_pid: int) -> list[int]:
    """Processes Flower started for `parent_pid` (`--parent-pid N`), wherever they now hang."""
    mark = ["--parent-pid", str(parent_pid)]
    found = []
    for entry in PROC.glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(argv[i : i + 2] == mark for i in range(len(argv) - 1)):
            found.append(int(entry.name))
    return found


def die_with_parent() -> None:
    """`preexec_fn` for a child that must not outlive medfed (Linux: PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: medfed's own stop() still ends the tree


def alive(pid: int) -> bool:
    """Whether process `pid` exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def terminate_tree(proc: subprocess.Popen[Any], grace: float = 15) -> None:
    """End `proc` (SIGTERM to its group, SIGKILL after `grace` s) and everything it started."""
    below = descendants(proc.pid)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.wait(timeout=5)
    rest = list(dict.fromkeys(below + flower_orphans(proc.pid)))
    for pid in list(rest):
        rest += [d for d in descendants(pid) if d not in rest]
    rest = [p for p in rest if alive(p)]
    _signal(rest, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while rest and time.monotonic() < deadline:
        time.sleep(0.1)
        rest = [p for p in rest if alive(p)]
    _signal(rest, signal.SIGKILL)
