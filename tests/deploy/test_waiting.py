"""`medfed run` says what it waits for, and stops waiting; `medfed site` names a taken port.

Real processes on 127.0.0.1: provisioned kits, `medfed server`, `medfed run`, `medfed site`.
"""

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.federation import Proc
from tests.medfed.helpers import free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _medfed(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "medfed"), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("waiting")
    port = free_port()
    done = _medfed(
        "provision", "--project", "waiting", "--server-host", "127.0.0.1", "--port", str(port),
        "--sites", "site-a,site-b", "--out", str(root / "kits"),
    )
    assert done.returncode == 0, done.stderr
    return root / "kits", port


@pytest.fixture(scope="module")
def server(kits: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    folder, port = kits
    root = tmp_path_factory.mktemp("waiting-server")
    proc = Proc(
        [
            "server", "--kit", str(folder / "server"), "--state", str(root / "state"),
            "--host", "127.0.0.1", "--port", str(port), "--health-port", str(free_port()),
            "--metrics-port", "0",
        ],
        root / "server.log",
    )
    try:
        proc.wait_for("medfed server ready", timeout=120)
        yield proc
    finally:
        proc.stop()


def test_a_run_without_its_sites_says_so_and_stops(
    kits: tuple[Path, int], server: Proc, tmp_path: Path
) -> None:
    folder, _ = kits
    started = time.monotonic()
    done = _medfed(
        "run", "--kit", str(folder / "operator"), "--out", str(tmp_path / "run"),
        "--rounds", "1", "--min-sites", "2", "--wait-timeout", "20", timeout=400,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr[-3000:]
    waiting = [line for line in done.stderr.splitlines() if "medfed waiting: 0 of 2 sites" in line]
    assert len(waiting) >= 3, done.stderr[-3000:]  # every 5 s over 20 s
    assert "--wait-timeout" in waiting[0]
    assert "0 of 2 sites (--min-sites) connected within 20s" in done.stderr
    assert not (tmp_path / "run" / "results.json").exists()
    runs = _medfed("runs", "--kit", str(folder / "operator"))
    assert "finished:failed" in runs.stdout, runs.stdout + runs.stderr
    assert elapsed < 300


def test_a_second_site_on_a_taken_port_is_told_which_flag_to_change(
    kits: tuple[Path, int], tmp_path: Path
) -> None:
    folder, _ = kits
    (tmp_path / "data").mkdir()
    for flag in ("--runtime-port", "--metrics-port"):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            other = "--metrics-port" if flag == "--runtime-port" else "--runtime-port"
            started = time.monotonic()
            done = _medfed(
                "site", "--kit", str(folder / "sites" / "site-a"), "--data", str(tmp_path / "data"),
                "--state", str(tmp_path / "state"), flag, str(port), other, str(free_port()),
            )
        assert done.returncode == 2, done.stdout + done.stderr
        message = " ".join(done.stderr.split())
        assert f"{flag} {port}" in message and "in use" in message, message
        free = int(message.split(f"pass {flag} ")[1].split()[0])
        assert free != port
        assert time.monotonic() - started < 60
