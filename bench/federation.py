"""A deployed federation on 127.0.0.1, as README's deployment runs it.

Provisioned kits, `medfed server` (SuperLink with TLS and SuperNode authentication), one
`medfed site` per hospital whose kit approved the app, and runs submitted with `medfed run` and
the operator kit.

Used by the deployment tests (tests/deploy/) and by the bench's deployed-round figures
(bench/deploy.py). Everything started is stopped on exit, by process.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.apps import build_app_bundle
from common.ports import free_loopback_port as free_port

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


class Proc:
    """A medfed process whose output goes to a log file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._file = log.open("w")
        self.popen = subprocess.Popen(
            [str(BIN / "medfed"), *args], stdout=self._file, stderr=subprocess.STDOUT
        )

    def text(self) -> str:
        """The process's output so far."""
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> None:
        """Until `needle` is in the log; raises RuntimeError (with the log's end) after timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return
            if self.popen.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(
            f"{needle!r} not in {self.log.name} after {timeout}s:\n{self.text()[-3000:]}"
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop it with `sig` (killed after 40 s); its exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self._file.close()
        return int(self.popen.returncode)


@dataclass
class Federation:
    """The federation's folders, ports and processes."""

    root: Path
    kits: Path
    data: Path
    state: Path
    port: int
    health_port: int
    metrics_port: int
    server: Proc | None = None
    sites: dict[str, Proc] = field(default_factory=dict)
    site_metrics: dict[str, int] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)
    app: Path | None = None  # the app `medfed run` submits (its sites approved it)

    def start_server(self, log_name: str) -> Proc:
        """`medfed server` with the server kit, ready when this returns."""
        self.server = Proc(
            [
                "server", "--kit", str(self.kits / "server"), "--state", str(self.state),
                "--host", "127.0.0.1", "--port", str(self.port),
                "--health-port", str(self.health_port), "--metrics-port", str(self.metrics_port),
            ],
            self.root / log_name,
        )
        self.server.wait_for("medfed server ready", timeout=120)
        return self.server

    def start_site(self, name: str, *flags: str) -> Proc:
        """`medfed site` for hospital `name` (its kit, data and state folder), started."""
        proc = Proc(
            [
                "site", "--kit", str(self.kits / "sites" / name),
                "--data", str(self.data / "sites" / name), "--state", str(self.root / name),
                "--runtime-port", str(free_port()),
                "--metrics-port", str(self.site_metrics.setdefault(name, free_port())), *flags,
            ],
            self.root / f"site-{name}-{len(self.sites)}{len(flags)}.log",
        )
        self.sites[name] = proc
        return proc

    def run(self, out: str, *flags: str) -> subprocess.Popen[str]:
        """`medfed run` into ROOT/out, with small local work unless `flags` say otherwise."""
        return subprocess.Popen(
            [
                str(BIN / "medfed"), "run", "--kit", str(self.kits / "operator"),
                "--out", str(self.root / out), "--batch-size", "16", "--local-steps", "2",
                *(["--app", str(self.app)] if self.app else []), *flags,
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )


def snapshot_app(dest: Path) -> tuple[Path, str]:
    """The repository's app as one consistent copy, and its FAB hash.

    The working tree may change while a federation runs, and any change is a new app version
    that the sites have not approved. The copy holds exactly the files of the bundle `flwr run`
    builds now, so it builds the same bundle, byte for byte.
    """
    content, bundle = build_app_bundle(ROOT)
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        for name in archive.namelist():
            if not name.startswith(".info/"):
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                (dest / name).write_bytes(archive.read(name))
    if build_app_bundle(dest)[1].sha256 != bundle.sha256:
        raise RuntimeError(f"{dest}: the app's copy builds another bundle")
    return dest, bundle.sha256


def finish(proc: subprocess.Popen[str], timeout: float = 400) -> tuple[int, str, str]:
    """A submitted run's exit code, stdout and stderr."""
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def results(run_dir: Path) -> dict[str, Any]:
    """A run folder's results.json."""
    return dict(json.loads((run_dir / "results.json").read_text()))


@contextlib.contextmanager
def provisioned(
    root: Path, *, project: str, data: Path, sites: list[str], timeout: float,
) -> Iterator[Federation]:
    """A provisioned federation on 127.0.0.1: the aggregator and one site per name.

    `data/sites/<name>` is each hospital's folder. Each hospital approves the app version it
    will run; everything started is stopped on exit.
    """
    fed = Federation(
        root=root, kits=root / "kits", data=data, state=root / "server-state",
        port=free_port(), health_port=free_port(), metrics_port=free_port(),
    )
    medfed = str(BIN / "medfed")
    subprocess.run(
        [medfed, "provision", "--project", project, "--server-host", "127.0.0.1",
         "--port", str(fed.port), "--sites", ",".join(sites), "--out", str(fed.kits)],
        check=True, capture_output=True,
    )
    fed.app, fab_hash = snapshot_app(root / "app")
    for name in sites:
        subprocess.run(
            [medfed, "site", "approve", "--kit", str(fed.kits / "sites" / name),
             "--fab-hash", fab_hash],
            check=True, capture_output=True,
        )
    try:
        fed.start_server("server.log")
        for name in sites:
            fed.start_site(name)
        for proc in fed.sites.values():
            proc.wait_for("SuperNode ID", timeout=timeout)
            # as a hospital's long-running site is when a run comes: its worker holds the app
            proc.wait_for("site worker ready", timeout=timeout)
            proc.wait_for("ClientApp launchpad ready", timeout=timeout)
        yield fed
    finally:
        for proc in fed.sites.values():
            proc.stop()
        if fed.server is not None:
            fed.server.stop()
