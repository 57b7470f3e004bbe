"""The ClientApp launchpad: Flower's `flwr-clientapp` tasks as children of a warm process.

A real launchpad process, spoken to as the launcher does (its arguments, environment, folder and
standard streams), and through the launcher script `medfed site` puts on the SuperNode's PATH.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.approval import write_launchers
from client.launchpad import socket_path
from common.flower_compat.clientapp_runtime import CLIENTAPP_COMMAND
from common.procs import descendants

ROOT = Path(__file__).resolve().parents[2]
PADS: dict[Path, int] = {}  # socket -> the launchpad's process id


@pytest.fixture
def launchpad(tmp_path: Path) -> Iterator[Path]:
    """A launchpad for the state folder tmp_path/state; its socket."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "client.launchpad", "--state", str(tmp_path / "state")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    path = socket_path((tmp_path / "state").resolve())
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert path.exists(), "the launchpad did not start"
    PADS[path] = proc.pid
    yield path
    proc.terminate()
    proc.wait(timeout=30)


def _launch(path: Path, argv: list[str], out: int, cwd: Path) -> socket.socket:
    """Hand a task to the launchpad as the launcher does; the connection it answers on."""
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(str(path))
    body = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": str(cwd)}).encode()
    socket.send_fds(conn, [struct.pack(">Q", len(body)) + body], [0, out, out])
    return conn


def _exit_code(conn: socket.socket) -> int:
    got = b""
    while len(got) < 4:
        part = conn.recv(4 - len(got))
        assert part, "the launchpad closed without an exit code"
        got += part
    return int(struct.unpack(">i", got)[0])


def test_a_task_runs_as_a_child_with_the_launchers_streams_folder_and_exit_code(
    launchpad: Path, tmp_path: Path
) -> None:
    read, write = os.pipe()
    with _launch(launchpad, ["--kit", str(tmp_path / "kit"), "--", "--help"], write,
                 tmp_path) as conn:
        os.close(write)
        code = _exit_code(conn)
    with os.fdopen(read) as output:
        text = output.read()
    assert code == 0 and "Run a Flower ClientApp" in text
    read, write = os.pipe()
    with _launch(launchpad, ["--kit", "k", "--", "--no-such-flag"], write, tmp_path) as conn:
        os.close(write)
        assert _exit_code(conn) == 2  # argparse's own exit code, as the command gave it
    with os.fdopen(read) as output:
        assert "flwr-clientapp: error:" in output.read()


def test_the_launcher_script_uses_the_launchpad_and_runs_alone_without_one(
    launchpad: Path, tmp_path: Path
) -> None:
    folder = write_launchers(tmp_path / "bin", tmp_path / "kit", launchpad=launchpad)
    command = [str(folder / CLIENTAPP_COMMAND), "--help"]
    through = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert through.returncode == 0 and "Run a Flower ClientApp" in through.stdout
    alone = subprocess.run(
        [str(write_launchers(tmp_path / "bin2", tmp_path / "kit",
                             launchpad=tmp_path / "none.sock") / CLIENTAPP_COMMAND), "--help"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert alone.returncode == 0 and alone.stdout == through.stdout


def test_a_launcher_that_goes_away_takes_its_child_with_it(
    launchpad: Path, tmp_path: Path
) -> None:
    # a task that would wait for ever: the runtime address answers nothing
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    read, write = os.pipe()
    argv = ["--kit", str(tmp_path / "kit"), "--", "--runtime-api-address",
            f"127.0.0.1:{port}", "--token", "t" * 32, "--insecure"]
    conn = _launch(launchpad, argv, write, tmp_path)
    os.close(write)
    deadline = time.monotonic() + 30
    while not _children(launchpad) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.set_blocking(read, False)
    assert _children(launchpad), os.read(read, 10000)
    conn.close()  # Flower stops the task: its launcher process ends
    deadline = time.monotonic() + 30  # SIGTERM, then SIGKILL after STOP_GRACE_S
    while _children(launchpad) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _children(launchpad)
    os.close(read)
    blocker.close()


def _children(path: Path) -> list[int]:
    """The running launchpad's child processes."""
    return descendants(PADS[path])
