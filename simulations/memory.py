"""Peak memory of a whole process tree (a driver and its Ray workers), measured from outside.

A simulation's memory is spread over processes: the driver, Ray's GCS and raylet, and one worker
per concurrent site. `peak_rss_of_command` runs a command and samples the summed resident set
size (RSS, from /proc; Linux only) of it and every process it starts, every `interval` seconds:

    code, peak_gib = peak_rss_of_command([".venv/bin/medfed", "simulate", "--scenario", "x.toml"])

Summed RSS counts pages shared between processes (libraries, Ray's object store) once per
process, so it overstates what the machine really spends: a conservative bound. A process that
leaves the tree (re-parented after a double fork) is still counted while it lives.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
GIB = 1024**3
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _parents() -> dict[int, int]:
    """Map every process visible in /proc to its parent."""
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone since the listing
        # the command name (field 2) may hold spaces and parentheses: split after its last ")"
        fields = stat[stat.rfind(")") + 2 :].split()
        out[int(entry.name)] = int(fields[1])
    return out


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_pids(root: int, known: set[int] | None = None) -> set[int]:
    """`root` and its live descendants, plus live processes in `known` (updated in place)."""
    parents = _parents()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = [root, *(known or ())]
    while stack:
        pid = stack.pop()
        if pid in found or pid not in parents:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    if known is not None:
        known |= found
    return found


def tree_rss_bytes(root: int, known: set[int] | None = None) -> int:
    """Summed RSS in bytes of `root`'s process tree now (see `tree_pids` for `known`)."""
    return sum(_rss(pid) for pid in tree_pids(root, known))


class PeakSampler:
    """Sample the RSS of `root`'s process tree in a background thread; `peak_gib` is the maximum.

    Use as a context manager around the work to measure (default root: this process).
    """

    def __init__(self, root: int | None = None, *, interval: float = 0.2) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.root = os.getpid() if root is None else root
        self.interval = interval
        self.peak_bytes = 0
        self.samples = 0
        self._known: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    @property
    def peak_gib(self) -> float:
        """The highest summed RSS seen, in GiB."""
        return self.peak_bytes / GIB

    def sample(self) -> int:
        """Take one sample now; returns it in bytes."""
        now = tree_rss_bytes(self.root, self._known)
        self.peak_bytes = max(self.peak_bytes, now)
        self.samples += 1
        return now

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def peak_rss_of_command(
    argv: Sequence[str],
    *,
    interval: float = 0.2,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
) -> tuple[int, float]:
    """Run `argv` to completion; return (exit code, peak GiB of its process tree's summed RSS).

    stdout and stderr are inherited. On `timeout` (seconds) the command is killed and
    subprocess.TimeoutExpired raised.
    """
    proc = subprocess.Popen(list(argv), env=dict(env) if env is not None else None, cwd=cwd)
    sampler = PeakSampler(proc.pid, interval=interval)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while proc.poll() is None:
            sampler.sample()
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(list(argv), timeout or 0)
            time.sleep(interval)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, sampler.peak_gib


def peak_rss_of_callable(fn: Callable[[], T], *, interval: float = 0.2) -> tuple[T, float]:
    """Call `fn()` in this process; return (its result, peak GiB of this process tree's RSS)."""
    with PeakSampler(interval=interval) as sampler:
        result = fn()
    sampler.sample()
    return result, sampler.peak_gib
