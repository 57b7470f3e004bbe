"""No operator credential, no control: the aggregator's Control API, attacked as issue 18 did.

A real `medfed server` (Flower's SuperLink behind the nginx gateway) on 127.0.0.1, provisioned
as README says. The attacker holds no kit, turns TLS verification off and uses Flower's own
`ControlHttpClient` on every host:port the kits name. Then: a certificate of another CA, the
server's own certificate, a revoked operator (refused within seconds, no restart), and a valid
operator who lists, starts and stops runs through `medfed run|runs|stop`.

The second server (finding 2) has one site unregistered behind its back: reconciliation goes on
and says what to do, and a restart on the same state comes up instead of exiting 1. Killing
its nginx ends `medfed server` with exit 1.
"""

import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
from flwr.proto.control_pb2 import (
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
    StreamLogsRequest,
    UnregisterNodeRequest,
)
from flwr.supercore.control import ControlHttpClient

from bench.federation import Proc
from common.kit import KIT_FILE
from server.gateway import find_nginx
from tests.medfed.helpers import free_port, missing

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SITES = ["hospital-a", "hospital-b"]


def _need_nginx() -> None:
    try:
        find_nginx()
    except RuntimeError as exc:
        missing(str(exc))


class Server(Proc):
    """`medfed server` with its output in a log file."""

    def __init__(self, kits: Path, state: Path, log: Path) -> None:
        super().__init__(
            ["server", "--kit", str(kits / "server"), "--state", str(state),
             "--host", "127.0.0.1"],
            log,
        )

    @property
    def internal_port(self) -> int:
        found = re.search(r"SuperLink on 127\.0\.0\.1:(\d+) \(internal", self.text())
        assert found, self.text()[-2000:]
        return int(found.group(1))


def provision(kits: Path, port: int) -> None:
    subprocess.run(
        [
            str(BIN / "medfed"), "provision", "--project", "gw", "--server-host", "127.0.0.1",
            "--port", str(port), "--sites", ",".join(SITES), "--out", str(kits),
        ],
        check=True, capture_output=True,
    )
    # the kit's own health and metrics ports, made free ones (tests run side by side)
    kit_file = kits / "server" / KIT_FILE
    values = tomllib.loads(kit_file.read_text())
    values["superlink"]["health-port"] = free_port()
    values["superlink"]["metrics-port"] = free_port()
    kit_file.write_text(tomli_w.dumps(values))


def every_address(kits: Path) -> set[tuple[str, int]]:
    """Every host:port any kit names: the server's hosts x its ports, and each kit's superlink."""
    addresses = set()
    for kit_file in kits.rglob(KIT_FILE):
        values = tomllib.loads(kit_file.read_text())
        if values["kind"] == "server":
            link = values["superlink"]
            for host in link["hosts"]:
                for key in ("port", "health-port", "metrics-port"):
                    addresses.add((host, int(link[key])))
        else:
            host, _, port = values["superlink"].rpartition(":")
            addresses.add((host, int(port)))
    return {(h, p) for h, p in addresses if h in {"127.0.0.1", "localhost"}}


def control_client(
    address: str, *, ca: Path | None = None, cert: tuple[Path, Path] | None = None
) -> ControlHttpClient:
    """Flower's own Control API client; without `ca`, TLS verification is off (the attacker)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return ControlHttpClient(f"https://{address}", verify=context, timeout=10)


def attacks(node_id: int) -> dict[str, Callable[[ControlHttpClient], Any]]:
    """The Control API calls issue 18 replayed, and the rest of what an attacker would try."""
    return {
        "ListNodes": lambda c: c.ListNodes(ListNodesRequest()),
        "ListRuns": lambda c: c.ListRuns(ListRunsRequest()),
        "StartRun": lambda c: c.StartRun(StartRunRequest()),
        "StopRun": lambda c: c.StopRun(StopRunRequest(run_id=1)),
        "StreamLogs": lambda c: next(iter(c.StreamLogs(StreamLogsRequest(run_id=1)))),
        "RegisterNode": lambda c: c.RegisterNode(RegisterNodeRequest(public_key=b"x")),
        "UnregisterNode": lambda c: c.UnregisterNode(UnregisterNodeRequest(node_id=node_id)),
    }


def refused(call: Callable[[ControlHttpClient], Any], client: ControlHttpClient) -> str:
    """How the call was refused; fails the test if it was served."""
    try:
        call(client)
    except httpx.HTTPStatusError as exc:
        assert exc.response.status_code in {400, 403, 404}, exc.response.text
        return f"HTTP {exc.response.status_code}"
    except (httpx.TransportError, ValueError) as exc:  # not even HTTPS (health, metrics ports)
        return type(exc).__name__
    finally:
        client.close()
    pytest.fail("the Control API call was served")


@dataclass
class Deployment:
    root: Path
    kits: Path
    port: int
    server: Server

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def operator(self, kit: Path | None = None) -> ControlHttpClient:
        kit = kit or self.kits / "operator"
        return control_client(
            self.address, ca=kit / "ca.crt", cert=(kit / "operator.crt", kit / "operator.key")
        )

    def nodes(self) -> dict[str, tuple[int, str]]:
        client = self.operator()
        try:
            listed = client.ListNodes(ListNodesRequest()).nodes_info
        finally:
            client.close()
        # a re-issued site's old, unregistered node keeps its name: the registered one wins
        ordered = sorted(listed, key=lambda n: n.status == "registered")
        return {n.name: (int(n.node_id), n.status) for n in ordered}

    def medfed(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "medfed"), *args], capture_output=True, text=True, timeout=timeout,
        )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    _need_nginx()
    root = tmp_path_factory.mktemp("gateway")
    port = free_port()
    provision(root / "kits", port)
    server = Server(root / "kits", root / "state", root / "server.log")
    try:
        server.wait_for("medfed server ready", timeout=120)
        yield Deployment(root, root / "kits", port, server)
    finally:
        server.stop()


def test_an_attacker_without_a_kit_is_refused_on_every_address_the_kits_name(
    deployment: Deployment,
) -> None:
    before = deployment.nodes()
    assert sorted(before) == SITES and all(s == "registered" for _, s in before.values())
    node_id = before["hospital-a"][0]
    addresses = every_address(deployment.kits)
    assert ("127.0.0.1", deployment.port) in addresses and len(addresses) >= 3
    outcomes = {}
    for host, port in sorted(addresses):
        for name, call in attacks(node_id).items():
            outcomes[(port, name)] = refused(call, control_client(f"{host}:{port}"))
    # on the kits' HTTPS port: the gateway's 403, before Flower sees the request
    for name in attacks(node_id):
        assert outcomes[(deployment.port, name)] == "HTTP 403", name
    assert deployment.nodes() == before  # nothing unregistered, nothing added
    log = (deployment.root / "state" / "gateway" / "access.log").read_text()
    assert '"POST /v1/control/unregister-node HTTP/1.1" 403 NONE' in log


def test_the_refusal_says_what_is_needed(deployment: Deployment) -> None:
    response = httpx.post(
        f"https://{deployment.address}/v1/control/list-runs", verify=False, content=b""
    )
    assert response.status_code == 403
    assert "operator certificate" in response.text


def test_a_certificate_of_another_federation_is_refused(
    deployment: Deployment, tmp_path: Path
) -> None:
    provision(tmp_path / "other", free_port())
    other = tmp_path / "other" / "operator"
    client = control_client(
        deployment.address, cert=(other / "operator.crt", other / "operator.key")
    )
    assert refused(lambda c: c.ListNodes(ListNodesRequest()), client) == "HTTP 400"


def test_the_servers_own_certificate_is_no_operator_certificate(deployment: Deployment) -> None:
    kit = deployment.kits / "server"
    client = control_client(
        deployment.address, ca=kit / "ca.crt", cert=(kit / "server.crt", kit / "server.key")
    )
    assert refused(lambda c: c.ListRuns(ListRunsRequest()), client).startswith("HTTP 4")


def test_fleet_and_health_stay_open_and_the_runtime_api_is_not_served(
    deployment: Deployment,
) -> None:
    base = f"https://{deployment.address}"
    assert httpx.get(f"{base}/health", verify=False).status_code == 200
    # reaches Flower, whose SuperNode authentication answers (not the gateway's 403/404)
    fleet = httpx.post(f"{base}/v1/fleet/activate-node", verify=False, content=b"")
    assert fleet.status_code not in {403, 404} and "medfed" not in fleet.text
    runtime = httpx.post(f"{base}/v1/runtime/list-apps", verify=False, content=b"")
    assert runtime.status_code == 404 and "medfed" in runtime.text


def test_an_operator_lists_starts_and_stops_runs(deployment: Deployment) -> None:
    kit = str(deployment.kits / "operator")
    assert set(deployment.nodes()) == set(SITES)
    log = deployment.root / "run.log"
    with log.open("w") as sink:
        # no site is connected: the run waits for them until it is stopped
        run = subprocess.Popen(
            [
                str(BIN / "medfed"), "run", "--kit", kit, "--out", str(deployment.root / "run"),
                "--rounds", "1", "--min-sites", "2",
            ],
            stdout=sink, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 180
            found = None
            while found is None and time.monotonic() < deadline and run.poll() is None:
                found = re.search(r"run (\d+) started", log.read_text())
                time.sleep(1)
            assert found is not None, log.read_text()[-3000:]
            run_id = found.group(1)
            listed = deployment.medfed("runs", "--kit", kit)
            assert listed.returncode == 0, listed.stderr
            assert run_id in listed.stdout
            stopped = deployment.medfed("stop", run_id, "--kit", kit)
            assert stopped.returncode == 0, stopped.stderr
            run.wait(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
    assert run.returncode == 1 and "stopped before it finished" in log.read_text()


def test_an_operator_kit_without_its_certificate_is_named_with_the_fix(
    deployment: Deployment, tmp_path: Path
) -> None:
    kit = tmp_path / "operator"
    shutil.copytree(deployment.kits / "operator", kit)
    (kit / "operator.crt").unlink()
    done = deployment.medfed("runs", "--kit", str(kit))
    assert done.returncode == 2, done.stderr
    assert "operator.crt" in done.stderr and "add-operator" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_revoked_operator_is_refused_within_seconds_without_a_restart(
    deployment: Deployment, tmp_path: Path
) -> None:
    added = deployment.medfed("provision", "add-operator", "bob", "--kits", str(deployment.kits))
    assert added.returncode == 0, added.stderr
    bob = tmp_path / "bob"  # what bob keeps after his revocation
    shutil.copytree(deployment.kits / "operators" / "bob", bob)
    assert deployment.operator(bob).ListNodes(ListNodesRequest()).nodes_info
    assert deployment.medfed("runs", "--kit", str(bob)).returncode == 0

    revoked = deployment.medfed(
        "provision", "revoke-operator", "bob", "--kits", str(deployment.kits)
    )
    assert revoked.returncode == 0, revoked.stderr
    assert not (deployment.kits / "operators" / "bob" / "operator.key").exists()
    start = time.monotonic()
    while time.monotonic() - start < 20:
        try:
            deployment.operator(bob).ListNodes(ListNodesRequest())
        except httpx.HTTPStatusError as exc:
            assert exc.response.status_code == 400
            break
        time.sleep(0.5)
    else:
        pytest.fail("bob's revoked certificate was still accepted after 20 s")
    print(f"revocation in force after {time.monotonic() - start:.1f}s")
    assert deployment.server.popen.poll() is None  # no restart
    done = deployment.medfed("runs", "--kit", str(bob))
    assert done.returncode == 3, done.stderr
    assert "revoked" in done.stderr and "add-operator" in done.stderr
    # the first operator is unaffected
    assert deployment.operator().ListNodes(ListNodesRequest()).nodes_info


# --- finding 2: an unregistered site, a restart, and nginx dying ------------------------------


def test_an_unregistered_site_neither_breaks_reconciliation_nor_a_restart(
    tmp_path: Path,
) -> None:
    _need_nginx()
    port = free_port()
    provision(tmp_path / "kits", port)
    kits, state = tmp_path / "kits", tmp_path / "state"
    server = Server(kits, state, tmp_path / "server-1.log")
    try:
        server.wait_for("medfed server ready", timeout=120)
        deployment = Deployment(tmp_path, kits, port, server)
        node_id = deployment.nodes()["hospital-a"][0]
        # the only way left to unregister: the operator, on the aggregator's own loopback port
        internal = control_client(
            f"127.0.0.1:{server.internal_port}", ca=kits / "server" / "ca.crt"
        )
        internal.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
        internal.close()
        assert deployment.nodes()["hospital-a"][1] == "unregistered"
        # a kit change forces a reconciliation pass now (the full pass comes every 30 s)
        os.utime(kits / "server" / KIT_FILE)
        server.wait_for("Re-issue the site's key", timeout=30)
        time.sleep(8)  # more passes: the same message is not repeated
        text = server.text()
        assert text.count("was unregistered at the SuperLink") == 1, text[-3000:]
        assert "Precondition Failed" not in text
        assert "medfed provision revoke-site hospital-a --kits KITS" in text
    finally:
        assert server.stop() == 0

    restarted = Server(kits, state, tmp_path / "server-2.log")
    try:
        restarted.wait_for("medfed server ready", timeout=120)
        assert "Re-issue the site's key" in restarted.text()
        time.sleep(4)
        assert restarted.popen.poll() is None, restarted.text()[-3000:]

        # the way out the message names: a new key for the site, registered within seconds
        for step in ("revoke-site", "add-site"):
            done = subprocess.run(
                [str(BIN / "medfed"), "provision", step, "hospital-a", "--kits", str(kits)],
                capture_output=True, text=True, timeout=60,
            )
            assert done.returncode == 0, done.stderr
        restarted.wait_for("registered site hospital-a as node", timeout=30)
        deployment = Deployment(tmp_path, kits, port, restarted)
        assert deployment.nodes()["hospital-a"][1] == "registered"

        # nginx dies: the federation's port is closed, and `medfed server` says so and exits 1
        pid = int((state / "gateway" / "nginx.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        restarted.popen.wait(timeout=60)
        assert restarted.popen.returncode == 1
        assert "the gateway (nginx) exited" in restarted.text()
    finally:
        restarted.stop()
