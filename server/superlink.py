"""`medfed server`: Flower's SuperLink behind the gateway, with the kit kept in force.

The SuperLink serves TLS with the kit's certificate, authenticates SuperNodes, keeps its state in
`--state` (a restart keeps runs and registered nodes) and runs ServerApps in subprocesses that
inherit MEDFED_STATE_DIR, so each deployed run writes its results under `STATE/runs/<run-id>`.
It listens on 127.0.0.1 only, on an internal port chosen at start that no kit names; the kit's
address is served by the gateway (server.gateway: nginx, the Control API for operator
certificates only). This process's own Control API calls and the ServerApps use the internal
port. If nginx or the SuperLink dies, `medfed server` ends with exit code 1.

While it runs, the server kit is the single source of truth for who may connect: every site in
it is registered with the SuperLink, and a node whose key is not in it (a revoked hospital, or
a key someone registered through the Control API by hand) is unregistered. Editing the kit with
`medfed provision add-site|revoke-site` takes effect within seconds, without a restart, and so
does a new operators.crl (`revoke-operator`).

Flower never registers a public key again once it was unregistered (the key stays in its
database, marked unregistered). A kit site whose key was unregistered at the SuperLink is
therefore reported, once, with the way out (re-issue the site's key), and never stops the
server or its reconciliation of the other sites.
"""

from __future__ import annotations

import errno
import http.client
import logging
import ssl
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from common.certs import load_public_key, public_key_pem
from common.kit import KIT_FILE, KitError
from common.ports import bind_failure, free_loopback_port
from common.procs import (
    die_with_parent,
    flower_environment,
    flower_executable,
    on_stop_signals,
    terminate_tree,
)
from common.server_kit import AuthorisedSite, ServerKit
from server.artifacts import STATE_ENV
from server.gateway import Gateway, GatewaySettings

log = logging.getLogger("medfed.server")

READY_TIMEOUT_S = 90.0
KIT_POLL_S = 3.0
FULL_RECONCILE_S = 30.0


@dataclass(frozen=True)
class ServerSettings:
    """Where the SuperLink listens and keeps its state."""

    kit: ServerKit
    state: Path
    host: str = "0.0.0.0"
    port: int | None = None  # default: the kit's
    health_port: int | None = None
    internal_port: int = 0  # the SuperLink's own, on 127.0.0.1; 0: a free one at start

    @property
    def link_port(self) -> int:
        """The HTTPS port: --port, else the kit's."""
        return self.port or self.kit.port

    @property
    def link_health_port(self) -> int:
        """The gRPC health port: --health-port, else the kit's."""
        return self.health_port or self.kit.health_port

    def command(self, internal_port: int) -> list[str]:
        """flower-superlink's argv: loopback only, on the internal port."""
        return [
            flower_executable("flower-superlink"),
            "--ssl-ca-certfile", str(self.kit.ca_cert),
            "--ssl-certfile", str(self.kit.cert),
            "--ssl-keyfile", str(self.kit.key),
            "--enable-supernode-auth",
            "--database", str(self.state / "superlink.db"),
            "--host", "127.0.0.1",
            "--port", str(internal_port),
            "--health-server-address", f"{self.host}:{self.link_health_port}",
            # the image already holds every dependency; never pip/uv-install at run time
            "--disable-runtime-dependency-installation",
        ]

    def environment(self) -> dict[str, str]:
        """The SuperLink's environment: state folder and Flower home."""
        env = flower_environment()
        env[STATE_ENV] = str(self.state.resolve())
        env.setdefault("FLWR_HOME", str((self.state / "flwr").resolve()))
        return env


def check_port_free(host: str, port: int, flag: str) -> None:
    """Raise ValueError naming the flag when the port cannot be listened on."""
    exc = bind_failure(host, port)
    if exc is None:
        return
    if exc.errno == errno.EADDRINUSE:
        raise ValueError(
            f"{flag} {port}: {host}:{port} is already in use (is another medfed server "
            f"running?); stop it or pass a free port with {flag}"
        )
    raise ValueError(f"{flag} {port}: cannot listen on {host}:{port} ({exc})")


def _pem(line: str, where: str) -> bytes:
    return public_key_pem(load_public_key(line, where=where))


def _normalise_pem(raw: bytes) -> bytes | None:
    try:
        key = serialization.load_pem_public_key(raw)
    except ValueError:
        return None
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass
class Reconciled:
    """What one pass of keeping the SuperLink's nodes equal to the kit changed."""

    registered: dict[str, int] = field(default_factory=dict)
    unregistered: list[int] = field(default_factory=list)
    present: dict[str, int] = field(default_factory=dict)
    # kit sites whose key Flower will not register again (unregistered before), or that
    # failed to register this pass: name -> why
    blocked: dict[str, str] = field(default_factory=dict)


def _rekey_hint(name: str) -> str:
    return (
        f"site {name}'s key was unregistered at the SuperLink (through the Control API), and "
        "Flower never registers an unregistered key again. Re-issue the site's key: "
        f"`medfed provision revoke-site {name} --kits KITS` then `medfed provision add-site "
        f"{name} --kits KITS`, and give the hospital its new kit; this server registers it "
        "within seconds"
    )


class NodeRegistry:
    """Registers the kit's sites with the SuperLink (Control API) and removes anyone else."""

    def __init__(self, address: str, ca_cert: Path) -> None:
        self.address, self.ca_cert = address, ca_cert
        self._reported: dict[str, str] = {}

    def _client(self) -> Any:  # Flower's ControlHttpClient
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        return ControlHttpClient.from_server_address(
            server_address=self.address,
            insecure=False,
            root_certificates=self.ca_cert.read_bytes(),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="medfed server")],
        )

    def reconcile(self, sites: Sequence[AuthorisedSite]) -> Reconciled:
        """Register every site in `sites` that is missing; unregister every node not in it."""
        import httpx
        from flwr.proto.control_pb2 import (
            ListNodesRequest,
            RegisterNodeRequest,
            UnregisterNodeRequest,
        )

        wanted = {_pem(s.public_key, f"site {s.name}"): s.name for s in sites}
        result = Reconciled()
        client = self._client()
        try:
            nodes = client.ListNodes(ListNodesRequest()).nodes_info
            for node in nodes:
                if node.status == "unregistered":
                    pem = _normalise_pem(bytes(node.public_key))
                    if pem in wanted:
                        result.blocked[wanted[pem]] = _rekey_hint(wanted[pem])
                    continue
                pem = _normalise_pem(bytes(node.public_key))
                if pem in wanted:
                    result.present[wanted[pem]] = int(node.node_id)
                    continue
                client.UnregisterNode(UnregisterNodeRequest(node_id=node.node_id))
                result.unregistered.append(int(node.node_id))
                log.warning(
                    "unregistered node %s: its key is not in the server kit (revoked, or "
                    "registered by hand)", node.node_id,
                )
            for pem, name in wanted.items():
                if name in result.present or name in result.blocked:
                    continue
                try:
                    response = client.RegisterNode(RegisterNodeRequest(public_key=pem, name=name))
                except httpx.HTTPStatusError as exc:
                    # one site's refusal must not keep the others from being reconciled
                    result.blocked[name] = (
                        f"the SuperLink refused to register site {name} "
                        f"(HTTP {exc.response.status_code}: {exc.response.text[:200]})"
                    )
                    continue
                result.registered[name] = int(response.node_id)
                log.info("registered site %s as node %s", name, response.node_id)
        finally:
            client.close()
        self._report(result.blocked)
        return result

    def _report(self, blocked: dict[str, str]) -> None:
        """Log each blocked site once (not every pass), and when it is resolved."""
        for name, why in blocked.items():
            if self._reported.get(name) != why:
                log.error("%s", why)
        for name in set(self._reported) - set(blocked):
            log.info("site %s: resolved (its key re-issued, or it left the kit)", name)
        self._reported = dict(blocked)


def wait_until_ready(
    address: str, ca_cert: Path, process: subprocess.Popen[bytes], timeout: float
) -> None:
    """Wait for the SuperLink's HTTPS /health; raise if it exits or never answers."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca_cert))
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"the SuperLink exited with code {process.returncode} while starting; "
                "its log above says why"
            )
        conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=2)
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except ssl.SSLCertVerificationError as exc:
            raise KitError(
                f"the SuperLink's certificate does not verify against the kit's ca.crt ({exc}); "
                "the server kit's files come from different provisionings: re-provision"
            ) from None
        except OSError as exc:
            last = str(exc)
        finally:
            conn.close()
        time.sleep(0.5)
    raise RuntimeError(f"the SuperLink did not answer on {address} within {timeout:.0f}s ({last})")


class ServerProcess:
    """The SuperLink subprocess plus the loop that keeps its registered nodes equal to the kit."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None
        self.internal_port = settings.internal_port or free_loopback_port()
        self.registry = NodeRegistry(self.local_address, settings.kit.ca_cert)
        self.gateway = Gateway(
            GatewaySettings(
                kit=settings.kit, folder=settings.state / "gateway", host=settings.host,
                port=settings.link_port, upstream_port=self.internal_port,
            )
        )
        self._stop = threading.Event()
        self._kit_mtime = 0.0

    @property
    def local_address(self) -> str:
        """The SuperLink's own loopback address (the certificate always names 127.0.0.1)."""
        return f"127.0.0.1:{self.internal_port}"

    def start(self) -> None:
        """Start the SuperLink and the gateway, wait until both answer, register the sites."""
        s = self.settings
        s.state.mkdir(parents=True, exist_ok=True)
        (s.state / "runs").mkdir(exist_ok=True)
        check_port_free(s.host, s.link_port, "--port")
        check_port_free(s.host, s.link_health_port, "--health-port")
        check_port_free("127.0.0.1", self.internal_port, "the internal SuperLink port")
        log.info(
            "starting Flower SuperLink on %s (internal, loopback only; state in %s)",
            self.local_address, s.state,
        )
        self.process = subprocess.Popen(  # noqa: S603 - our own argv, no shell
            s.command(self.internal_port), env=s.environment(), start_new_session=True,
            preexec_fn=die_with_parent,
        )
        wait_until_ready(self.local_address, s.kit.ca_cert, self.process, READY_TIMEOUT_S)
        self.gateway.start()
        try:
            self.sync_kit(force=True)
        except Exception as exc:  # noqa: BLE001 - retried by the loop; never a reason to exit
            log.warning("could not reconcile registered sites (will retry): %s", exc)

    def sync_kit(self, *, force: bool = False) -> Reconciled | None:
        """Re-read the server kit if it changed (or `force`) and reconcile the nodes."""
        kit_file = self.settings.kit.path / KIT_FILE
        try:
            mtime = kit_file.stat().st_mtime
        except OSError:
            log.error("server kit %s disappeared; keeping the last registrations", kit_file)
            return None
        if not force and mtime == self._kit_mtime:
            return None
        try:
            kit = ServerKit.load(self.settings.kit.path)
        except (KitError, ValueError) as exc:
            log.error("server kit unreadable, keeping the last registrations: %s", exc)
            return None
        self._kit_mtime = mtime
        result = self.registry.reconcile(kit.sites)
        names = ", ".join(s.name for s in kit.sites) or "none"
        log.info("sites authorised by the kit: %s", names)
        return result

    def run_until_stopped(self) -> int:
        """Supervise until SIGINT/SIGTERM (returns 0) or the SuperLink dies (returns 1)."""
        assert self.process is not None, "start() first"
        last_full = time.monotonic()
        while not self._stop.wait(KIT_POLL_S):
            if self.process.poll() is not None:
                log.error("the SuperLink exited with code %s", self.process.returncode)
                return 1
            gateway_code = self.gateway.exit_code()
            if gateway_code is not None:
                log.error(
                    "the gateway (nginx) exited with code %s: the federation's port is closed; "
                    "its message above says why (restart `medfed server`)", gateway_code,
                )
                return 1
            self.gateway.reload_if_crl_changed()
            full = time.monotonic() - last_full > FULL_RECONCILE_S
            try:
                self.sync_kit(force=full)
            except Exception as exc:  # noqa: BLE001 - a failed pass is retried, never fatal
                log.warning("could not reconcile registered sites (will retry): %s", exc)
            if full:
                last_full = time.monotonic()
        return 0

    def stop(self) -> None:
        """Stop the gateway, then the SuperLink (SIGTERM, then SIGKILL after 15 s)."""
        self._stop.set()
        self.gateway.stop()
        if self.process is not None:
            terminate_tree(self.process)

    def install_signal_handlers(self) -> None:
        """SIGINT and SIGTERM end `run_until_stopped`."""
        on_stop_signals("the SuperLink", self._stop.set)
