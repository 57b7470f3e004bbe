"""The gateway's nginx configuration and the flwr CLI patch, without a running SuperLink.

The behaviour against a real SuperLink (who is refused, who is served, revocation within
seconds) is tested in tests/deploy/test_gateway.py.
"""

import ssl
from pathlib import Path

import flwr
import pytest
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.protobuf.client import ProtobufClient

from common.flower_compat import FlowerVersionError
from common.server_kit import ServerKit
from server import flwr_operator
from server.gateway import Gateway, GatewayError, GatewaySettings, find_nginx
from server.provision import provision
from tests.medfed.helpers import missing


@pytest.fixture()
def kits(tmp_path: Path) -> Path:
    provision(tmp_path / "kits", project="p", server_hosts=["127.0.0.1"], sites=["a"])
    return tmp_path / "kits"


def settings(kits: Path, folder: Path) -> GatewaySettings:
    return GatewaySettings(
        kit=ServerKit.load(kits / "server"), folder=folder, host="127.0.0.1", port=19092,
        upstream_port=19093,
    )


def test_the_config_routes_control_only_to_operator_certificates(
    kits: Path, tmp_path: Path
) -> None:
    config = settings(kits, tmp_path / "gw").config()
    assert "ssl_verify_client optional;" in config
    assert f'ssl_crl "{(kits / "server" / "operators.crl").resolve()}";' in config
    assert '"~^SUCCESS:CN=[A-Za-z0-9._-]+,OU=medfed-operator$" 1;' in config
    control = config[config.index("location /v1/control/"):config.index("location / {")]
    assert "if ($medfed_operator = 0)" in control and "return 403" in control
    # the SuperLink is reached on loopback only, over TLS checked against the CA
    assert "server 127.0.0.1:19093;" in config
    assert "proxy_ssl_verify on;" in config and "proxy_pass https://superlink;" in config
    assert "/v1/runtime" not in config  # not proxied: the catch-all answers 404
    assert "listen 127.0.0.1:19092 ssl;" in config


def test_nginx_accepts_the_config(kits: Path, tmp_path: Path) -> None:
    try:
        find_nginx()
    except GatewayError as exc:
        missing(str(exc))
    Gateway(settings(kits, tmp_path / "gw")).write_config()  # runs `nginx -t`


def test_nginx_refuses_a_damaged_kit_with_the_files_named(kits: Path, tmp_path: Path) -> None:
    try:
        find_nginx()
    except GatewayError as exc:
        missing(str(exc))
    (kits / "server" / "server.crt").write_text("not a certificate")
    with pytest.raises(GatewayError, match="server.crt, server.key"):
        Gateway(settings(kits, tmp_path / "gw")).write_config()


def test_a_path_nginx_cannot_quote_is_refused(kits: Path, tmp_path: Path) -> None:
    with pytest.raises(GatewayError, match="quotes"):
        settings(kits, tmp_path / 'g"w').config()


def test_the_cli_patch_presents_the_certificate_and_is_undone(
    kits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    operator = kits / "operator"
    ca = (operator / "ca.crt").read_bytes()
    made: list[tuple[object, Path, Path]] = []
    real = flwr_operator.operator_context

    def recording(root: bytes | str | None, cert: Path, key: Path) -> ssl.SSLContext:
        made.append((root, cert, key))
        return real(root, cert, key)  # loads the chain: a wrong key would raise here

    monkeypatch.setattr(flwr_operator, "operator_context", recording)
    with flwr_operator.presenting(operator / "operator.crt", operator / "operator.key"):
        client = ControlHttpClient.from_server_address("127.0.0.1:1", False, ca, [])
        client.close()
        with pytest.raises(ValueError, match="must use TLS"):
            ControlHttpClient.from_server_address("127.0.0.1:1", True, None, [])
    assert made == [(ca, operator / "operator.crt", operator / "operator.key")]
    with pytest.raises(ssl.SSLError):  # the key must belong to the certificate
        real(ca, operator / "operator.crt", kits / "server" / "server.key")
    assert "from_server_address" not in ControlHttpClient.__dict__
    assert ControlHttpClient.from_server_address.__func__ is (  # type: ignore[attr-defined]
        ProtobufClient.from_server_address.__func__  # type: ignore[attr-defined]
    )


def test_the_cli_patch_refuses_another_flower_release(
    kits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    with pytest.raises(FlowerVersionError, match="Flower 9.9.9 is installed.*1.41.0"):
        with flwr_operator.presenting(kits / "operator" / "operator.crt", kits / "x"):
            pass
