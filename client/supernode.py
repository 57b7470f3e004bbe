"""`medfed site`: one hospital's Flower SuperNode, started from its kit, kept connected.

Before anything connects, the site's data is checked (`medfed check-data`): a site with unusable
images does not join. The SuperNode then runs with the kit's CA as root certificate, the site's
private key for authentication, and `data-path`, `site-name`, `state-dir`, `audit-key` as node
config: the ClientApp reads images from that one folder and nothing else, and signs its audit
trail with the kit's key. Every ClientApp task goes through medfed's app check first
(client.approval): an app version the hospital did not approve in its kit never runs.

Failures are told apart, because a hospital IT person acts differently on each:
- the aggregator is unreachable or restarting: wait and reconnect, with growing back-off;
- the aggregator's certificate is not signed by the kit's CA: permanent, exit 3;
- the aggregator refuses this site's key (never provisioned, or revoked): permanent, exit 3.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from client.approval import LAUNCHER_DIR, write_launchers
from client.launchpad import socket_path as launchpad_socket
from client.worker_link import SOCKET_ENV, WorkerSupervisor, socket_path
from common import logs
from common.certs import fingerprint
from common.flower_compat.supernode_poll import POLL_ENV
from common.kit import SiteKit
from common.ports import check_free
from common.procs import (
    die_with_parent,
    flower_environment,
    on_stop_signals,
    terminate_tree,
)

log = logging.getLogger("medfed.site")

# What Flower's SuperNode prints (exit code 305 in its message, though the process exits 1) when
# the SuperLink refuses to activate its key (FLEET_NODE_ACTIVATION_FAILED): not registered.
KEY_REFUSED_MARK = "Failed to activate SuperNode"
# A just-started aggregator registers the kit's sites within seconds; a refusal is only
# believed once it has been seen this many times in a row, that long apart.
REFUSALS_BEFORE_GIVING_UP = 3
REFUSAL_RETRY_S = 5.0
BACKOFF_START_S, BACKOFF_MAX_S = 2.0, 60.0
# Flower's SuperExec (started by the SuperNode) looks for new ClientApp tasks this often
SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", 0.1
STAMPED = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


class SiteRefused(RuntimeError):
    """The aggregator will never accept this site as it is; the message says why and the fix."""


@dataclass(frozen=True)
class SiteSettings:
    """Everything the SuperNode is started with."""

    kit: SiteKit
    data: Path
    state: Path
    runtime_port: int = 9094
    health_port: int | None = None
    budget_epsilon: float | None = None
    ledger_dir: Path | None = None
    poll_interval: float = 2.0  # an idle SuperNode's longest wait for a message (Flower's: 3 s)

    def command(self) -> list[str]:
        """flower-supernode's argv."""
        pairs: list[tuple[str, object]] = [
            ("data-path", self.data.resolve()),
            ("site-name", self.kit.site),
            ("state-dir", self.state.resolve()),
            # the kit's key signs the site's audit trail (client.audit_state)
            ("audit-key", self.kit.private_key.resolve()),
        ]
        if self.ledger_dir is not None:
            pairs.append(("ledger-dir", self.ledger_dir.resolve()))
        node_config = " ".join(f'{key}="{value}"' for key, value in pairs)
        if self.budget_epsilon is not None:
            node_config += f" budget-epsilon={self.budget_epsilon!r}"
        argv = [
            # Flower's flower-supernode, with prompt waits (common.flower_compat.supernode_poll)
            sys.executable, "-c", "from common.flower_compat.supernode_poll import main; main()",
            "--superlink", self.kit.superlink,
            "--root-certificates", str(self.kit.ca_cert),
            "--auth-supernode-private-key", str(self.kit.private_key),
            "--node-config", node_config,
            "--host", "127.0.0.1",
            "--port", str(self.runtime_port),
        ]
        if self.health_port:
            argv += ["--health-server-address", f"0.0.0.0:{self.health_port}"]
        return argv

    @property
    def launcher_dir(self) -> Path:
        """The commands Flower's SuperExec starts (client.approval), first on the PATH."""
        return (self.state / LAUNCHER_DIR).resolve()

    def environment(self) -> dict[str, str]:
        """The SuperNode's environment: Flower home under the site's state, app check on PATH.

        The app-checking `flwr-clientapp` (client.approval) comes before Flower's own.
        """
        env = flower_environment()
        env.setdefault("FLWR_HOME", str((self.state / "flwr").resolve()))
        env["PATH"] = os.pathsep.join([str(self.launcher_dir), env["PATH"]])
        # the ClientApp hands every message to the site's warm worker (client.shim)
        env[SOCKET_ENV] = str(socket_path(self.state.resolve()))
        # Flower's SuperExec looks for a new ClientApp task every second by default
        env.setdefault(SUPEREXEC_POLL_ENV, str(SUPEREXEC_POLL_S))
        env[POLL_ENV] = str(self.poll_interval)
        return env


def stamped(line: str) -> str:
    """`line` with the time in front, unless it starts with one (medfed's own log lines do).

    Flower's SuperNode logs without timestamps ("INFO :      Received: train message ...").
    """
    if STAMPED.match(line) or not line.strip():
        return line
    return f"{time.strftime(logs.DATE_FORMAT)} {line}"


def check_site_ports(
    *, runtime_port: int, health_port: int | None, metrics_host: str, metrics_port: int
) -> None:
    """Raise PortTaken (naming the flag and a free port) if a port the site listens on is taken.

    Checked before the site starts: a second site on the same machine with the default ports
    otherwise fails inside Flower's SuperNode, which only says it exited, again and again.
    """
    check_free({
        "--runtime-port": ("127.0.0.1", runtime_port),
        "--health-port": ("0.0.0.0", health_port or 0),
        "--metrics-port": (metrics_host, metrics_port),
    })


def check_node_config_value(path: Path, flag: str) -> None:
    """Flower's node config is `key="value"` pairs: a quote in a path would break it."""
    if '"' in str(path.resolve()):
        raise ValueError(f"{flag} {path}: the path must not contain a double quote; rename it")


def probe_aggregator(kit: SiteKit, timeout: float = 5.0) -> str | None:
    """None when a TLS handshake with the aggregator succeeds, else why it is unreachable.

    Raises SiteRefused when the aggregator answers with a certificate the kit's CA did not sign.
    """
    host, _, port = kit.superlink.rpartition(":")
    context = ssl.create_default_context(cafile=str(kit.ca_cert))
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host.strip("[]")):
                return None
    except ssl.SSLCertVerificationError as exc:
        raise SiteRefused(
            f"the aggregator at {kit.superlink} presented a certificate that this kit's CA "
            f"does not trust ({exc.verify_message}); the kit belongs to another federation or "
            "the aggregator was re-provisioned: ask the operator for a new site kit"
        ) from None
    except ssl.SSLError as exc:
        return f"TLS handshake failed ({exc.reason}); is {kit.superlink} the medfed aggregator?"
    except OSError as exc:
        return str(exc) or type(exc).__name__


class SiteProcess:
    """Run the SuperNode; reconnect on transient trouble, stop on a permanent refusal."""

    def __init__(self, settings: SiteSettings) -> None:
        self.settings = settings
        self.process: subprocess.Popen[str] | None = None
        self.worker = WorkerSupervisor(settings.state, echo=self._print, data_dir=settings.data)
        self.launchpad = WorkerSupervisor(settings.state, echo=self._print,
                                          module="client.launchpad")
        self._stop = threading.Event()
        self._tail: deque[str] = deque(maxlen=40)

    def _wait_reachable(self) -> bool:
        delay = BACKOFF_START_S
        while not self._stop.is_set():
            reason = probe_aggregator(self.settings.kit)
            if reason is None:
                return True
            log.warning(
                "aggregator %s unreachable (%s); retrying in %.0fs",
                self.settings.kit.superlink, reason, delay,
            )
            if self._stop.wait(delay):
                return False
            delay = min(delay * 2, BACKOFF_MAX_S)
        return False

    def _echo(self, stream: IO[str]) -> None:
        for line in stream:
            self._tail.append(line)
            self._print(line)

    @staticmethod
    def _print(line: str) -> None:
        print(stamped(line), end="", flush=True)

    def _run_once(self) -> int:
        self._tail.clear()
        write_launchers(self.settings.launcher_dir, self.settings.kit.path,
                        launchpad=launchpad_socket(self.settings.state.resolve()))
        proc = subprocess.Popen(  # noqa: S603 - our own argv, no shell
            self.settings.command(), env=self.settings.environment(), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.process = proc
        assert proc.stdout is not None
        # Read in a thread: processes the SuperNode leaves behind may hold the pipe open.
        reader = threading.Thread(target=self._echo, args=(proc.stdout,), daemon=True)
        reader.start()
        code = proc.wait()
        terminate_tree(proc)
        reader.join(timeout=5)
        return code

    def run(self) -> int:
        """Supervise the SuperNode until stopped (0) or permanently refused (SiteRefused).

        The site's warm worker (client.worker) and the ClientApp launchpad (client.launchpad)
        start first and live as long as this does.
        """
        self.worker.start()
        self.launchpad.start()
        try:
            return self._supervise()
        finally:
            self.launchpad.stop()
            self.worker.stop()

    def _supervise(self) -> int:
        refusals, delay = 0, BACKOFF_START_S
        while not self._stop.is_set():
            if not self._wait_reachable():
                break
            started = time.monotonic()
            code = self._run_once()
            if self._stop.is_set():
                break
            refused = code != 0 and any(KEY_REFUSED_MARK in line for line in self._tail)
            if refused:
                refusals += 1
                if refusals >= REFUSALS_BEFORE_GIVING_UP:
                    key = fingerprint(self.settings.kit.public_key.read_text())
                    raise SiteRefused(
                        f"the aggregator at {self.settings.kit.superlink} refuses site "
                        f"{self.settings.kit.site!r}'s key ({key}): it is not registered there, "
                        "it was revoked or never provisioned. Ask the operator to run "
                        f"`medfed provision add-site {self.settings.kit.site}` and send you the "
                        "new kit"
                    )
                log.warning("aggregator refused this site's key; checking again shortly")
                self._stop.wait(REFUSAL_RETRY_S)
                continue
            refusals = 0
            if time.monotonic() - started > 5 * BACKOFF_MAX_S:
                delay = BACKOFF_START_S  # it ran for a while: this is a fresh failure
            log.warning(
                "SuperNode exited with code %s; reconnecting in %.0fs", code, delay
            )
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, BACKOFF_MAX_S)
        return 0

    def stop(self) -> None:
        """Stop supervising and end the SuperNode with everything it started."""
        self._stop.set()
        if self.process is not None:
            terminate_tree(self.process)
        self.launchpad.stop()
        self.worker.stop()

    def install_signal_handlers(self) -> None:
        """SIGINT and SIGTERM stop the site cleanly."""
        on_stop_signals("the site", self.stop)
