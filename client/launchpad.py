"""A warm start for the ClientApp processes Flower's SuperExec asks for at a site.

    python -m client.launchpad --state STATE [--owner-pid PID]

Flower starts one `flwr-clientapp` process per message. Even with the training in the warm
worker (client.worker), each such process spends about 2 s of a 2-core machine importing
Flower's runtime before it asks for its message (bench/deploy.py's site logs). The launchpad
imports that once (Flower's ClientApp runtime, medfed's app check, the ClientApp shim; no torch)
and forks a child for every task: the child starts with everything imported.

The `flwr-clientapp` command on the SuperNode's PATH (client.approval.write_launchers) is a small
program: it connects to `STATE/worker/launch.sock`, hands over its arguments, environment,
working folder and standard streams, and exits with the child's exit code. The child runs
exactly what the command ran before, `client.approval.main`: the app check against the kit, then
Flower's own `flwr-clientapp`. Without a launchpad the command runs that itself.

One thread and no other: a fork copies only the forking thread, so nothing another thread held
can be left locked in a child. A launcher that goes away (Flower stopping the task) takes its
child with it. Only the site's user may connect (socket mode 0600 in a 0700 folder, peer uid).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from client import worker_link as link
from common.procs import alive

log = logging.getLogger("medfed.site")

SOCKET = "launch.sock"
_LENGTH = struct.Struct(">Q")
_CODE = struct.Struct(">i")
MAX_REQUEST = 1 << 20
STOP_GRACE_S = 5.0  # a stopped task's child gets this long to report, then it is killed

# The `flwr-clientapp` launcher (run with `python -S`: no site-packages to scan, so it starts in
# milliseconds). argv: --socket SOCK --kit KIT -- FLWR_CLIENTAPP_ARGS...
LAUNCHER = r"""
import json, os, socket, struct, sys
a = sys.argv[1:]
sock, kit, args = a[1], a[3], a[5:]
checked = ["--kit", kit, "--", *args]
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
except OSError:
    entry = "from client.approval import main; main()"
    os.execv(sys.executable, [sys.executable, "-c", entry, *checked])
body = json.dumps({"argv": checked, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
socket.send_fds(s, [struct.pack(">Q", len(body)) + body], [0, 1, 2])
got = b""
while len(got) < 4:
    part = s.recv(4 - len(got))
    if not part:
        sys.exit("medfed site: the ClientApp launchpad stopped during this task")
    got += part
sys.exit(struct.unpack(">i", got)[0])
"""


def socket_path(state_dir: Path) -> Path:
    """Where the site's launchpad listens."""
    return link.folder(state_dir) / SOCKET


def _prepare() -> None:
    """Import what every ClientApp process needs, once (never torch: the shim does not)."""
    from flwr.supernode.cli import flwr_clientapp  # noqa: F401

    import client.approval  # noqa: F401 - imported for its children
    import client.shim  # noqa: F401
    import common.flower_compat.clientapp_runtime  # noqa: F401
    import common.flower_compat.wire  # noqa: F401


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    first, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    if len(first) < _LENGTH.size:
        raise ValueError("a request shorter than its length")
    (size,) = _LENGTH.unpack_from(first)
    if size > MAX_REQUEST:
        raise ValueError(f"a request of {size} bytes")
    body = first[_LENGTH.size:]
    while len(body) < size:
        part = conn.recv(size - len(body))
        if not part:
            raise ValueError("the launcher closed mid-request")
        body += part
    request = json.loads(body)
    if len(fds) != 3 or not isinstance(request, dict):
        raise ValueError("a request without its three standard streams")
    return request, list(fds)


def _child(inherited: list[socket.socket], request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become the launcher's `flwr-clientapp` and run it. Never returns.

    `inherited`: the launchpad's sockets, which the child closes.
    """
    code = 1
    try:
        for sock in inherited:
            sock.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in request["env"].items()})
        os.chdir(str(request["cwd"]))
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        from client.approval import main

        try:
            main([str(a) for a in request["argv"]])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
    except BaseException as exc:  # noqa: BLE001 - the child must end here, whatever happened
        print(f"medfed site: the ClientApp task failed to start ({exc})", file=sys.stderr)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


class Launchpad:
    """The fork server: one listening socket, one launcher connection per running child."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.children: dict[int, socket.socket] = {}
        self.stopping: dict[int, float] = {}  # child -> when it is killed if still running
        self._stop = False

    def bind(self) -> socket.socket:
        """The listening socket (worker_link.listen)."""
        return link.listen(socket_path(self.state_dir), backlog=16)

    def serve(self, owner_pid: int | None = None) -> None:
        """Start a child per launcher until stopped or the owner (`medfed site`) is gone."""
        server = self.bind()
        events = selectors.DefaultSelector()
        events.register(server, selectors.EVENT_READ, None)
        log.info("ClientApp launchpad ready (pid %d)", os.getpid())
        try:
            while not self._stop:
                if owner_pid is not None and not alive(owner_pid):
                    break
                for key, _ in events.select(timeout=0.05):
                    if key.fileobj is server:
                        self._launch(server, events)
                    else:  # a launcher went away: its task is over, stop its child
                        self._abandoned(key.data, events)
                self._reap(events)
        finally:
            for pid in list(self.children):
                _signal(pid, signal.SIGTERM)
            server.close()
            socket_path(self.state_dir).unlink(missing_ok=True)

    def stop(self, *_: Any) -> None:
        """Stop after the current loop turn (children are sent SIGTERM)."""
        self._stop = True

    def _launch(self, server: socket.socket, events: selectors.BaseSelector) -> None:
        conn, _ = server.accept()
        try:
            if link.peer_uid(conn) != os.getuid():
                log.warning("ClientApp launchpad: refused another user's connection")
                conn.close()
                return
            conn.settimeout(5)
            request, fds = _receive(conn)
        except (OSError, ValueError) as exc:
            log.warning("ClientApp launchpad: unreadable request (%s)", exc)
            conn.close()
            return
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:
            _child([server, conn, *self.children.values()], request, fds)
        for fd in fds:
            os.close(fd)
        conn.setblocking(False)
        self.children[pid] = conn
        events.register(conn, selectors.EVENT_READ, pid)

    def _abandoned(self, pid: int, events: selectors.BaseSelector) -> None:
        conn = self.children.get(pid)
        if conn is None:
            return
        try:
            if conn.recv(1):
                return  # a launcher sends nothing more; ignore it
        except BlockingIOError:
            return
        except OSError:
            pass
        events.unregister(conn)
        _signal(pid, signal.SIGTERM)  # Flower's own handler reports the task stopped
        self.stopping[pid] = time.monotonic() + STOP_GRACE_S

    def _reap(self, events: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for pid, deadline in list(self.stopping.items()):
            if now > deadline:
                _signal(pid, signal.SIGKILL)
                del self.stopping[pid]
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            self.stopping.pop(pid, None)
            if conn is None:
                continue
            try:
                events.unregister(conn)
            except (KeyError, ValueError):
                pass
            try:
                conn.setblocking(True)
                conn.sendall(_CODE.pack(os.waitstatus_to_exitcode(status)))
            except OSError:
                pass
            conn.close()


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    """`python -m client.launchpad --state STATE [--owner-pid PID]`."""
    parser = argparse.ArgumentParser(prog="python -m client.launchpad")
    parser.add_argument("--state", type=Path, required=True, help="the site's state folder")
    parser.add_argument("--owner-pid", type=int, default=None,
                        help="stop when this process (medfed site) is gone")
    args = parser.parse_args(argv)
    from common import logs

    logs.configure()
    started = time.perf_counter()
    _prepare()
    pad = Launchpad(args.state.resolve())
    signal.signal(signal.SIGTERM, pad.stop)
    signal.signal(signal.SIGINT, pad.stop)
    log.info("ClientApp launchpad loaded Flower's runtime in %.1f s",
             time.perf_counter() - started)
    pad.serve(owner_pid=args.owner_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
