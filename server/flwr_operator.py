"""Flower's `flwr` CLI, presenting the operator's client certificate to the Control API.

`medfed run`, `runs` and `stop` drive Flower's own CLI (server.submit) as
`python -m server.flwr_operator ARGS...`, which is `flwr ARGS...` with this one change.

How Flower's CLI is made to present it is common.flower_compat.control_client's (Flower's
CLI has no setting for a client certificate).
"""

from __future__ import annotations

import os
import ssl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.flower_compat import FlowerVersionError, control_client

CERT_ENV = "MEDFED_OPERATOR_CERT"
KEY_ENV = "MEDFED_OPERATOR_KEY"


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
    """Within the block, every Control API client Flower's CLI makes presents `cert`.

    Raises FlowerVersionError on a Flower release the patch was not checked against.
    """
    with control_client.presenting(lambda root: operator_context(root, cert, key)):
        yield


def main() -> None:
    """`flwr ARGS...` presenting the certificate named by $MEDFED_OPERATOR_CERT/KEY."""
    from flwr.cli.app import app

    cert, key = os.environ.get(CERT_ENV), os.environ.get(KEY_ENV)
    if not cert or not key:
        sys.exit(f"{CERT_ENV} and {KEY_ENV} must name the operator's certificate and key")
    sys.argv[0] = "flwr"
    try:
        with presenting(Path(cert), Path(key)):
            app()
    except FlowerVersionError as exc:
        sys.exit(f"medfed: {exc}")


if __name__ == "__main__":
    main()
