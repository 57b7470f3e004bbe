"""The aggregator's small HTTP server: Prometheus `/metrics`, the live dashboard and its JSON.

Routes:
    /              the dashboard page (server/dashboard/, shipped in the package: no CDN)
    /app.js, /style.css
    /metrics       Prometheus text format, from the run's own registry
    /api/state     JSON snapshot the dashboard polls every 2 seconds

It listens on 127.0.0.1 unless told otherwise: the metrics name sites and show their privacy
spend, so exposing them beyond the aggregator's machine is a deliberate choice.
"""

from __future__ import annotations

import errno
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from common.metrics_endpoint import DEFAULT_HOST, MetricsPortError, MetricsSettings
from common.outputs import json_clean
from server.metrics import RunMetrics

DEFAULT_PORT = 9400

_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}


def _asset(name: str) -> bytes:
    return (resources.files("server") / "dashboard" / name).read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: _Server  # narrowed for the type checker

    def do_GET(self) -> None:
        """Serve one of the routes in the module docstring."""
        path = self.path.split("?", 1)[0]
        metrics = self.server.metrics
        if path == "/metrics":
            self._send(metrics.prometheus_text(), CONTENT_TYPE_LATEST)
        elif path == "/api/state":
            body = json.dumps(json_clean(metrics.snapshot()), allow_nan=False).encode()
            self._send(body, "application/json")
        elif path in _STATIC:
            name, content_type = _STATIC[path]
            self._send(_asset(name), content_type)
        else:
            self._send(b"not found: try / or /metrics\n", "text/plain", HTTPStatus.NOT_FOUND)

    def _send(self, body: bytes, content_type: str, status: int = HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: a scrape every few seconds would flood the run's console."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], metrics: RunMetrics, family: int) -> None:
        self.address_family = family
        self.metrics = metrics
        super().__init__(address, _Handler)


class MetricsServer:
    """Serve one `RunMetrics` over HTTP from a background thread.

    `port=0` asks the operating system for a free port (tests); the CLI treats 0 as "off" and
    never builds a server then. `flag` is how the user set the port, named in errors.
    """

    def __init__(
        self,
        metrics: RunMetrics,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        flag: str = "--metrics-port",
    ) -> None:
        self.metrics = metrics
        self.host, self.port, self.flag = host, port, flag
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def host_flag(self) -> str:
        """How the user set the host (the port's flag with port -> host)."""
        return self.flag.replace("port", "host")

    @property
    def url(self) -> str:
        """The dashboard's address."""
        # a wildcard address listens everywhere; this machine reaches it on loopback
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    def start(self) -> MetricsServer:
        """Bind and serve; raises MetricsPortError naming the flag when that is impossible."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            self._httpd = _Server((self.host, self.port), self.metrics, family)
        except socket.gaierror:
            raise MetricsPortError(
                f"{self.host_flag} {self.host!r} is not an address of this machine; "
                "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
            ) from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise MetricsPortError(
                    f"{self.flag} {self.port}: {self.host}:{self.port} is already in use (is "
                    f"another medfed run still going?); pass a free port, e.g. {self.flag} "
                    f"{self.port + 1 if self.port < 65535 else 9400}, or {self.flag} 0 to run "
                    "without metrics and dashboard"
                ) from None
            if exc.errno == errno.EACCES:
                raise MetricsPortError(
                    f"{self.flag} {self.port}: not allowed to listen on {self.host}:{self.port} "
                    "(ports below 1024 need root); pass a port above 1024, e.g. 9400"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise MetricsPortError(
                    f"{self.host_flag} {self.host!r} is not an address of this machine; "
                    "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
                ) from None
            raise
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
            name="medfed-metrics", daemon=True,
        )
        self._thread.start()
        return self

    def use(self, metrics: RunMetrics) -> None:
        """Serve another run's metrics from now on (a deployed aggregator runs one by one)."""
        self.metrics = metrics
        if self._httpd is not None:
            self._httpd.metrics = metrics

    def stop(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd, self._thread = None, None

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def serve_metrics(
    settings: MetricsSettings, *, flag: str = "--metrics-port"
) -> Iterator[MetricsServer | None]:
    """A running MetricsServer for a fresh RunMetrics, or None when `settings.port` is 0."""
    if settings.port == 0:
        yield None
        return
    with MetricsServer(RunMetrics(), host=settings.host, port=settings.port, flag=flag) as server:
        yield server
