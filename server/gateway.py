"""The aggregator's front door: nginx in front of Flower's SuperLink, with operator mTLS.

Flower 1.41's open-source SuperLink serves its Fleet, Control and Runtime APIs on one HTTPS
port and authenticates no Control API caller (account login is a Flower Enterprise plugin), so
anyone who reached that port could list, start and stop runs and unregister hospitals.
`medfed server` therefore binds the SuperLink to 127.0.0.1 on an internal port that no kit
names, and puts Debian's nginx (a real, maintained TLS terminator: medfed writes no transport
of its own) on the kit's address:

- `/v1/fleet/` and `/health`: proxied for anyone; the SuperLink's SuperNode authentication
  still decides which hospital may use Fleet;
- `/v1/control/`: proxied only when the client presented a certificate that verifies against
  the project CA, is not on the CA's revocation list (the server kit's `operators.crl`), has
  the clientAuth purpose (OpenSSL refuses the server's own certificate, which is serverAuth
  only) and names OU=medfed-operator; anyone else gets 403 saying what is needed;
- everything else (the SuperLink's internal `/v1/runtime/`, ...): 404.

The hop to the SuperLink is TLS again, checked against the CA under the name `localhost`
(which the server certificate always carries). Streams (`flwr log`, `medfed run`'s results)
pass unbuffered over HTTP/1.1 with day-long read timeouts. nginx runs unprivileged as a child
of `medfed server` (`nginx -p STATE/gateway -c nginx.conf -g 'daemon off;'`), with its pid,
temp files and access log (who called the Control API, with which certificate) in
STATE/gateway; a changed CRL is applied with SIGHUP, nginx's own graceful reload.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from common.certs import OPERATOR_OU, load_crl
from common.kit import KitError
from common.procs import die_with_parent
from common.server_kit import ServerKit

log = logging.getLogger("medfed.gateway")

NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 10.0
# Long enough for the quietest stretch of a run's log stream (a slow round on a big model).
STREAM_TIMEOUT = "24h"
# Flower pushes model arrays in chunks of up to 5 MiB and app bundles of up to 10 MB.
MAX_BODY = "64m"
REFUSAL = (
    "medfed: the Control API needs an operator certificate issued by this federation's CA "
    "(KITS/operator or `medfed provision add-operator NAME`); none was presented, or it is not "
    "an operator certificate"
)


class GatewayError(RuntimeError):
    """nginx is missing, refused its configuration, or died; the message says what to do."""


def find_nginx() -> str:
    """The nginx binary; raises GatewayError naming the package that provides it."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in NGINX_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    raise GatewayError(
        "nginx not found: `medfed server` serves its port through nginx (the SuperLink itself "
        "listens on 127.0.0.1 only); install it, e.g. `apt-get install nginx-light`"
    )


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _quote(path: Path) -> str:
    text = str(path.resolve())
    if any(c in text for c in '"\\;{}$\n'):
        raise GatewayError(f"{text}: nginx cannot be given a path with quotes, ';', '{{', '$'")
    return f'"{text}"'


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway listens, what it proxies to, and where it keeps its files."""

    kit: ServerKit
    folder: Path  # STATE/gateway
    host: str
    port: int
    upstream_port: int  # the SuperLink's, on 127.0.0.1

    @property
    def config_file(self) -> Path:
        """The generated nginx.conf."""
        return self.folder / "nginx.conf"

    @property
    def access_log(self) -> Path:
        """Each request but Fleet's and /health: time, client, path, status, certificate."""
        return self.folder / "access.log"

    def config(self) -> str:
        """nginx.conf for this kit and these ports."""
        folder, kit = self.folder, self.kit
        tmp = folder / "tmp"
        # Only certificates this CA issues pass SUCCESS; of those, only operator certificates
        # have this exact subject (names are validated like site names, so no escaped commas).
        operator_dn = f"~^SUCCESS:CN=[A-Za-z0-9._-]+,OU={OPERATOR_OU}$"
        proxy = "            proxy_pass https://superlink;\n"
        # sites poll Fleet every few seconds: logging it would grow the log by megabytes a day
        quiet = "            access_log off;\n"
        return f"""# Written by `medfed server` at every start (server/gateway.py); edits are lost.
worker_processes 1;
pid {_quote(folder / "nginx.pid")};
error_log stderr warn;

events {{
    worker_connections 1024;
}}

http {{
    server_tokens off;
    default_type text/plain;
    log_format medfed '$time_iso8601 $remote_addr "$request" $status '
                      '$ssl_client_verify "$ssl_client_s_dn"';
    access_log {_quote(self.access_log)} medfed;
    client_body_temp_path {_quote(tmp / "body")};
    proxy_temp_path {_quote(tmp / "proxy")};
    fastcgi_temp_path {_quote(tmp / "fastcgi")};
    uwsgi_temp_path {_quote(tmp / "uwsgi")};
    scgi_temp_path {_quote(tmp / "scgi")};
    client_max_body_size {MAX_BODY};

    map "$ssl_client_verify:$ssl_client_s_dn" $medfed_operator {{
        default 0;
        "{operator_dn}" 1;
    }}

    upstream superlink {{
        server 127.0.0.1:{self.upstream_port};
        keepalive 16;
    }}

    server {{
        listen {_listen(self.host, self.port)} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {_quote(kit.cert)};
        ssl_certificate_key {_quote(kit.key)};
        ssl_client_certificate {_quote(kit.ca_cert)};
        ssl_verify_client optional;
        ssl_verify_depth 1;
        ssl_crl {_quote(kit.operators_crl)};
        # no session resumption: a revoked certificate must not ride on an earlier session
        ssl_session_tickets off;
        ssl_session_cache off;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {_quote(kit.ca_cert)};
        proxy_ssl_name localhost;
        proxy_ssl_verify_depth 1;
        proxy_buffering off;
        proxy_request_buffering off;
        proxy_read_timeout {STREAM_TIMEOUT};
        proxy_send_timeout {STREAM_TIMEOUT};

        location /v1/fleet/ {{
{quiet}{proxy}        }}
        location = /health {{
{quiet}{proxy}        }}
        location /v1/control/ {{
            if ($medfed_operator = 0) {{
                return 403 "{REFUSAL}\\n";
            }}
{proxy}        }}
        location / {{
            return 404 "medfed: not served here\\n";
        }}
    }}
}}
"""


def _crl_state(path: Path) -> tuple[int, int, int, str] | None:
    try:
        st = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size, digest)


class Gateway:
    """nginx as a child process: started, reloaded when the CRL changes, stopped by pid."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None
        self._crl: tuple[int, int, int, str] | None = None

    def command(self) -> list[str]:
        """The nginx argv: our prefix and config, in the foreground, errors to our stderr."""
        s = self.settings
        return [
            find_nginx(), "-e", "stderr", "-p", str(s.folder.resolve()),
            "-c", str(s.config_file.resolve()), "-g", "daemon off;",
        ]

    def write_config(self) -> None:
        """Write nginx.conf and its temp folders; check it with `nginx -t`."""
        s = self.settings
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (s.folder / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(s.folder, 0o700)
        s.config_file.write_text(s.config())
        check = subprocess.run(  # noqa: S603 - our own argv, no shell
            [*self.command()[:-2], "-t", "-q"], capture_output=True, text=True, check=False,
            timeout=30,
        )
        if check.returncode != 0:
            raise GatewayError(
                f"nginx refused {s.config_file}: {check.stderr.strip()}; check the server kit's "
                f"files ({s.kit.path}: server.crt, server.key, ca.crt, operators.crl)"
            )

    def start(self) -> None:
        """Start nginx and wait until it answers /health through the SuperLink."""
        s = self.settings
        self._check_crl()
        self._crl = _crl_state(s.kit.operators_crl)
        self.write_config()
        log.info(
            "starting the gateway (nginx) on %s, proxying to the SuperLink on 127.0.0.1:%s; "
            "Control API for operator certificates only (requests logged to %s)",
            _listen(s.host, s.port), s.upstream_port, s.access_log,
        )
        self.process = subprocess.Popen(  # noqa: S603 - our own argv, no shell
            self.command(), start_new_session=True, preexec_fn=die_with_parent,
        )
        self._wait_until_ready()

    def _check_crl(self) -> None:
        kit = self.settings.kit
        try:
            load_crl(kit.operators_crl, kit.ca_cert)
        except ValueError as exc:
            raise KitError(
                f"{exc}; re-issue it with `medfed provision revoke-operator` or re-provision"
            ) from None

    def _wait_until_ready(self) -> None:
        s = self.settings
        assert self.process is not None
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(s.host, s.host)
        context = ssl.create_default_context(cafile=str(s.kit.ca_cert))
        context.check_hostname = False  # liveness only; the CA check still applies
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise GatewayError(
                    f"the gateway (nginx) exited with code {self.process.returncode} while "
                    "starting; its message above says why"
                )
            conn = http.client.HTTPSConnection(host, s.port, context=context, timeout=3)
            try:
                conn.request("GET", "/health")
                status = conn.getresponse().status
                if status == 200:
                    return
                last = f"HTTP {status}"
                if status == 502:
                    last += " (nginx could not reach or verify the SuperLink)"
            except OSError as exc:
                last = str(exc)
            finally:
                conn.close()
            time.sleep(0.3)
        raise GatewayError(
            f"the gateway did not answer on {_listen(host, s.port)} within "
            f"{READY_TIMEOUT_S:.0f}s ({last})"
        )

    def exit_code(self) -> int | None:
        """The exit code of nginx once it has exited, else None."""
        return None if self.process is None else self.process.poll()

    def reload_if_crl_changed(self) -> bool:
        """SIGHUP nginx when operators.crl changed and is a valid CRL of the CA."""
        state = _crl_state(self.settings.kit.operators_crl)
        if state is None or state == self._crl or self.process is None:
            return False
        try:
            self._check_crl()
        except KitError as exc:
            log.error("operators.crl changed but is unusable, keeping the last one: %s", exc)
            self._crl = state
            return False
        self._crl = state
        self.process.send_signal(signal.SIGHUP)
        log.info("operators.crl changed: the gateway reloaded it (revoked operators refused)")
        return True

    def stop(self) -> None:
        """Stop nginx by its pid: SIGTERM (fast shutdown), SIGKILL after a grace period.

        nginx runs in its own process group (its pid), so a master that died on its own, whose
        workers would otherwise keep the port, is cleaned up too.
        """
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # nginx's master ends its workers on SIGTERM
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers left behind by a killed master
        except (ProcessLookupError, PermissionError):
            pass
