"""Flower's CLI, presenting a client certificate to the SuperLink's Control API.

Flower's CLI has no setting for a client certificate (Flower 1.41.0 and 1.42.0, read from the
packages):
- every Control API client of the CLI is made by `init_http_client_from_connection`
  (flwr/cli/utils.py) with `ControlHttpClient.from_server_address(server_address, insecure,
  root_certificates, interceptors)`;
- that classmethod (flwr/supercore/protobuf/client.py, `ProtobufClient`) turns the CA into an
  `ssl.SSLContext` passed to httpx as `verify`, and takes no client certificate; the connection
  config (`[superlink.NAME]` in config.toml) has no key for one either;
- httpx presents whatever certificate that context holds (`SSLContext.load_cert_chain`).

So, within `presenting()`, `ControlHttpClient.from_server_address` builds the same client with
the TLS context the caller makes (server.flwr_operator's holds the operator's certificate).
Nothing else of the CLI changes.

Gate: on a Flower release this was not checked against, the CLI would call the aggregator
without a certificate and be turned away with a less clear error, so `presenting` refuses.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from common.flower_compat import Gate

GATE = Gate(
    patch="the operator certificate on `medfed run`/`runs`/`stop` (server/flwr_operator.py)",
    flower_code="flwr/supercore/protobuf/client.py (ProtobufClient.from_server_address) and "
                "flwr/cli/utils.py (init_http_client_from_connection)",
    test="tests/server/test_gateway_config.py",
)

# (root_certificates as Flower passes them: PEM bytes, a CA file path, or None) -> the context
ContextFactory = Callable[[bytes | str | None], ssl.SSLContext]


@contextmanager
def presenting(make_context: ContextFactory) -> Iterator[None]:
    """Within the block, every Control API client Flower's CLI makes uses `make_context`'s TLS.

    Raises FlowerVersionError on a Flower release this was not checked against.
    """
    GATE.require()
    from flwr.supercore.control import ControlHttpClient

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
            verify=make_context(root_certificates),
            retry_invoker=retry_invoker,
        )

    patched: Any = classmethod(from_server_address)
    ControlHttpClient.from_server_address = patched  # type: ignore[method-assign]
    try:
        yield
    finally:
        # the class's own attribute goes; ProtobufClient's inherited one is back
        del ControlHttpClient.from_server_address
