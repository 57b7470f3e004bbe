"""Flower's `flwr` CLI, presenting the operator's client certificate to the Control API.

`medfed run`, `runs` and `stop` drive Flower's own CLI (server.submit) as
`python -m server.flwr_operator ARGS...`, which is `flwr ARGS...` with this one change.

Why a patch (Flower 1.41.0, read from the installed package):
- every Control API client of the CLI is made by `init_http_client_from_connection`
  (flwr/cli/utils.py) with `ControlHttpClient.from_server_address(server_address, insecure,
  root_certificates, interceptors)`;
- that classmethod (flwr/supercore/protobuf/client.py, `ProtobufClient`) turns the CA into an
  `ssl.SSLContext` passed to httpx as `verify`, and takes no client certificate; the connection
  config (`[superlink.NAME]` in config.toml) has no key for one either;
- httpx presents whatever certificate that context holds (`SSLContext.load_cert_chain`).

So, within `presenting()`, `ControlHttpClient.from_server_address` builds the same client with
a context that also holds the operator's certificate and key. Nothing else of the CLI changes.
The patch is written against Flower `FLOWER_VERSION`; another release is refused (the CLI would
otherwise call the aggregator without a certificate and be turned away with a less clear error).
"""

from __future__ import annotations

import os
import ssl
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import flwr
from flwr.supercore.control import ControlHttpClient

CERT_ENV = "MEDFED_OPERATOR_CERT"
KEY_ENV = "MEDFED_OPERATOR_KEY"
# the Flower release whose CLI internals this module was written against (pyproject pins it)
FLOWER_VERSION = "1.41.0"


def operator_context(
    root_certificates: bytes | str | None, cert: Path, key: Path
) -> ssl.SSLContext:
    """A TLS client context trusting the CA and presenting the operator's certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if isinstance(root_certificates, bytes):
        context.load_verify_locations(cadata=root_certificates.decode("ascii"))
    elif isinstance(root_certificates, str):
        context.load_verify_locations(cafile=root_certificates)
    else:
        context.load_default_certs()
    context.load_cert_chain(str(cert), str(key))
    return context


@contextmanager
def presenting(cert: Path, key: Path) -> Iterator[None]:
    """Within the block, every Control API client Flower's CLI makes presents `cert`."""
    if flwr.__version__ != FLOWER_VERSION:
        raise RuntimeError(
            f"Flower {flwr.__version__}: medfed presents the operator certificate through a patch "
            f"written for Flower {FLOWER_VERSION} (server/flwr_operator.py); install "
            f"flwr=={FLOWER_VERSION} (pyproject.toml pins it)"
        )

    def from_server_address(
        cls: type[ControlHttpClient],
        server_address: str,
        insecure: bool,
        root_certificates: bytes | str | None,
        interceptors: Sequence[Any],
        *,
        retry_invoker: Any = None,
    ) -> ControlHttpClient:
        if insecure:
            raise ValueError("the operator's connection must use TLS (insecure is set)")
        return cls(
            f"https://{server_address}",
            interceptors=interceptors,
            verify=operator_context(root_certificates, cert, key),
            retry_invoker=retry_invoker,
        )

    patched: Any = classmethod(from_server_address)
    ControlHttpClient.from_server_address = patched  # type: ignore[method-assign]
    try:
        yield
    finally:
        # the class's own attribute goes; ProtobufClient's inherited one is back
        del ControlHttpClient.from_server_address


def main() -> None:
    """`flwr ARGS...` presenting the certificate named by $MEDFED_OPERATOR_CERT/KEY."""
    from flwr.cli.app import app

    cert, key = os.environ.get(CERT_ENV), os.environ.get(KEY_ENV)
    if not cert or not key:
        sys.exit(f"{CERT_ENV} and {KEY_ENV} must name the operator's certificate and key")
    sys.argv[0] = "flwr"
    with presenting(Path(cert), Path(key)):
        app()


if __name__ == "__main__":
    main()
