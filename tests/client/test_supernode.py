"""`medfed site`'s checks before and around Flower's SuperNode."""

import socket
import ssl
import threading
from pathlib import Path

import pytest

from client.supernode import SiteRefused, SiteSettings, probe_aggregator
from common.kit import SiteKit
from server.provision import provision


def _kits(root: Path, port: int) -> Path:
    provision(root, project=root.name, server_hosts=["127.0.0.1"], sites=["a"], port=port)
    return root


def _tls_server(server_kit: Path) -> tuple[socket.socket, threading.Thread]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_kit / "server.crt", server_kit / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with context.wrap_socket(conn, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_probe_accepts_the_federations_aggregator_and_refuses_another(tmp_path: Path) -> None:
    listener, thread = _tls_server(_kits(tmp_path / "ours", 1) / "server")
    port = listener.getsockname()[1]
    try:
        ours = _kits(tmp_path / "ours-again", port)  # a different CA, same address
        theirs_kit = SiteKit.load(ours / "sites" / "a")
        with pytest.raises(SiteRefused, match="does not trust"):
            probe_aggregator(theirs_kit)
    finally:
        listener.close()
        thread.join(timeout=5)

    listener, thread = _tls_server(tmp_path / "ours" / "server")
    port = listener.getsockname()[1]
    try:
        site = SiteKit.load(tmp_path / "ours" / "sites" / "a")
        site = SiteKit(site.path, site.project, site.site, f"127.0.0.1:{port}")
        assert probe_aggregator(site) is None
    finally:
        listener.close()
        thread.join(timeout=5)


def test_an_unreachable_aggregator_is_transient_not_a_refusal(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    site = SiteKit.load(_kits(tmp_path / "k", port) / "sites" / "a")
    reason = probe_aggregator(site, timeout=2)
    assert reason is not None and "refused" in reason.lower()


def test_the_supernode_reads_only_the_site_folder(tmp_path: Path) -> None:
    site = SiteKit.load(_kits(tmp_path / "k", 9092) / "sites" / "a")
    argv = SiteSettings(site, tmp_path / "data", tmp_path / "state").command()
    config = argv[argv.index("--node-config") + 1]
    assert f'data-path="{(tmp_path / "data").resolve()}"' in config
    assert 'site-name="a"' in config
    assert argv[argv.index("--root-certificates") + 1] == str(site.ca_cert)
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(site.private_key)
    assert "--insecure" not in argv
