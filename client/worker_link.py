"""The local link to a site's warm worker: where it listens, what is said, who may say it.

Torch-free: the ClientApp shim (client.shim) and `medfed site` use it; the worker's side is
client.worker. A request is one connection: a JSON header frame, then the header's binary
frames. Frames are an 8-byte big-endian length and that many bytes.

- The socket is `STATE/worker/worker.sock`, in a folder of mode 0700, created with mode 0600,
  so only the site's own user can connect; the worker also checks each peer's credentials
  (SO_PEERCRED) and refuses any other user.
- The worker runs one app version: its `code` is the SHA-256 of the app's Python source
  (`code_identity`). A ClientApp from another version asks `medfed site`'s supervisor for a
  worker started from its own folder (`WANT_FILE`), and the old one is stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from common.atomic import write_text

log = logging.getLogger("medfed.site")

FOLDER = "worker"  # under the site's state folder
SOCKET = "worker.sock"
WANT_FILE = "want.json"  # the app folder and code the next worker is started from
# the environment variable `medfed site` gives the SuperNode: the worker's socket
SOCKET_ENV = "MEDFED_SITE_WORKER"
PACKAGES = ("client", "common", "models")  # the app's code a worker runs
_HEADER = struct.Struct(">Q")
MAX_FRAME = 8 << 30
CONNECT_WAIT_S = 300.0  # a worker starting (torch, the app) or restarting after a crash


class WorkerGone(RuntimeError):
    """The worker closed the connection before its answer: it stopped or was killed."""


class WorkerUnavailable(RuntimeError):
    """No worker answered on the site's socket in time."""


def folder(state_dir: Path) -> Path:
    """The worker's folder in the site's state (mode 0700)."""
    return state_dir / FOLDER


def socket_path(state_dir: Path) -> Path:
    """Where the site's worker listens."""
    return folder(state_dir) / SOCKET


def code_identity(project: Path) -> str:
    """SHA-256 over the app's Python source under `project` (names and bytes, sorted)."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((project / package).rglob("*.py")):
            digest.update(str(path.relative_to(project)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def app_folder() -> Path:
    """The folder this process's app code was loaded from (a FAB's install, or the checkout)."""
    return Path(__file__).resolve().parents[1]


def listen(path: Path, backlog: int = 8) -> socket.socket:
    """A Unix socket listening at `path`, for the site's own user only.

    Mode 0600, in its folder of mode 0700; a stale socket left there is replaced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.listen(backlog)
    return server


# --- frames ------------------------------------------------------------------------------------


def send_frames(conn: socket.socket, header: dict[str, Any], payloads: Sequence[bytes] = ()
                ) -> None:
    """One request or answer: the JSON header (with the number of payloads), then payloads."""
    frames = [json.dumps({**header, "frames": len(payloads)}).encode(), *payloads]
    for frame in frames:
        conn.sendall(_HEADER.pack(len(frame)))
        conn.sendall(frame)


def _exactly(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise WorkerGone("the connection closed mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive_frames(conn: socket.socket) -> tuple[dict[str, Any], list[bytes]]:
    """The header and its payloads; raises WorkerGone when the other side closes first."""
    (size,) = _HEADER.unpack(_exactly(conn, _HEADER.size))
    if size > MAX_FRAME:
        raise WorkerGone(f"a frame of {size} bytes is larger than any message")
    header = json.loads(_exactly(conn, size))
    if not isinstance(header, dict):
        raise WorkerGone("the header is not an object")
    count = int(header.get("frames", 0))
    payloads = []
    for _ in range(count):
        (size,) = _HEADER.unpack(_exactly(conn, _HEADER.size))
        if size > MAX_FRAME:
            raise WorkerGone(f"a frame of {size} bytes is larger than any message")
        payloads.append(_exactly(conn, size))
    return header, payloads


def peer_uid(conn: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (Linux SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


# --- the client side (ClientApp shim, `medfed site`) ------------------------------------------


def request(path: Path, header: dict[str, Any], payloads: Sequence[bytes] = (), *,
            timeout: float | None = None) -> tuple[dict[str, Any], list[bytes]]:
    """Send one request to the worker at `path`; its answer.

    Raises OSError when nothing listens there, WorkerGone when it closes without answering.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(str(path))
        send_frames(conn, header, payloads)
        return receive_frames(conn)


def hello(path: Path, timeout: float = 10.0) -> dict[str, Any] | None:
    """The worker's hello (`code`, `pid`), or None when no worker answers at `path`."""
    try:
        answer, _ = request(path, {"op": "hello"}, timeout=timeout)
    except (OSError, WorkerGone, ValueError):
        return None
    return answer


def wait_for_worker(path: Path, code: str | None, wait_s: float = CONNECT_WAIT_S
                    ) -> dict[str, Any]:
    """The hello of a worker at `path` running `code` (any code when None), waiting for it."""
    deadline = time.monotonic() + wait_s
    answer = None
    while time.monotonic() < deadline:
        answer = hello(path)
        if answer is not None and (code is None or answer.get("code") == code):
            return answer
        time.sleep(0.1)
    seen = "no worker answered" if answer is None else f"a worker of app {answer.get('code')}"
    raise WorkerUnavailable(f"{seen} at {path} within {wait_s:.0f} s")


def want(state_dir: Path, project: Path, code: str) -> None:
    """Ask the supervisor for a worker of `code`, started from `project`, from now on."""
    write_text(folder(state_dir) / WANT_FILE,
               json.dumps({"project": str(project), "code": code}), permissions=0o600)


def wanted(state_dir: Path) -> tuple[Path, str | None]:
    """The app folder the next worker starts from, and its code (None: this checkout's)."""
    path = folder(state_dir) / WANT_FILE
    try:
        value = json.loads(path.read_text())
        project = Path(value["project"])
        if (project / "client" / "worker.py").is_file():
            return project, str(value["code"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return app_folder(), None


# --- `medfed site`'s supervisor ----------------------------------------------------------------


@dataclass
class WorkerSupervisor:
    """Keep one worker running for the site: start it, restart it when it dies, stop it.

    `echo` receives the worker's output lines (the site's own log).
    """

    state_dir: Path
    echo: Any = None  # Callable[[str], None]
    data_dir: Path | None = None  # the worker decodes it once before the first run
    restart_after_s: float = 1.0
    # the process it keeps: the worker (started from the app version the ClientApp asked for),
    # or the ClientApp launchpad (client.launchpad; this checkout's code)
    module: str = "client.worker"

    def __post_init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.starts = 0

    @property
    def socket(self) -> Path:
        """Where the worker listens."""
        return socket_path(self.state_dir.resolve())

    def start(self) -> None:
        """Start the worker and the thread that restarts it."""
        box = folder(self.state_dir)
        box.mkdir(parents=True, exist_ok=True)
        os.chmod(box, 0o700)
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="site-worker", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        project = wanted(self.state_dir)[0] if self.module == "client.worker" else app_folder()
        env = {**os.environ, "PYTHONPATH": str(project)}
        self.process = subprocess.Popen(  # noqa: S603 - our own argv, no shell
            [sys.executable, "-m", self.module, "--state", str(self.state_dir.resolve()),
             "--owner-pid", str(os.getpid()),
             *(["--data", str(self.data_dir.resolve())] if self.data_dir is not None else [])],
            cwd=project, env=env, text=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.starts += 1
        assert self.process.stdout is not None
        threading.Thread(target=self._relay, args=(self.process.stdout,), daemon=True).start()

    def _relay(self, stream: IO[str]) -> None:
        for line in stream:
            if self.echo is not None:
                self.echo(line)

    def _watch(self) -> None:
        while not self._stop.is_set():
            proc = self.process
            if proc is None:
                return
            code = proc.wait()
            if self._stop.is_set():
                return
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            log.warning("%s stopped (%s); starting a new one", self.module, how)
            if self._stop.wait(self.restart_after_s):
                return
            self._spawn()

    def stop(self) -> None:
        """Stop the worker for good."""
        self._stop.set()
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
