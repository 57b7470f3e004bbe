import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common.ports import PortTaken, bind_error, check_free, free_port_after

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def taken() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def test_a_listening_port_is_taken_and_the_next_free_one_is_offered(taken) -> None:
    port = taken.getsockname()[1]
    assert bind_error("127.0.0.1", port)
    free = free_port_after("127.0.0.1", port)
    assert free > port and bind_error("127.0.0.1", free) is None
    with pytest.raises(PortTaken, match=rf"--metrics-port {port}: .* pass --metrics-port {free}"):
        check_free({"--metrics-port": ("127.0.0.1", port)})


def test_off_ports_are_skipped_and_two_flags_on_one_port_clash(taken) -> None:
    check_free({"--health-port": ("0.0.0.0", 0)})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PortTaken, match="--metrics-port .* is also --runtime-port"):
        check_free({"--runtime-port": ("127.0.0.1", port), "--metrics-port": ("127.0.0.1", port)})


def test_the_command_line_runs_without_the_venv_and_names_the_make_variable(taken) -> None:
    # what `make demo` runs first, with the system's python and no dependency installed
    port = taken.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-E", "-S", "-m", "common.ports", "--how", "make demo METRICS_PORT={free}",
         f"METRICS_PORT=127.0.0.1:{port}"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 2
    assert f"METRICS_PORT {port}" in done.stderr and "make demo METRICS_PORT=" in done.stderr


def test_an_address_not_of_this_machine_is_named_as_such() -> None:
    with pytest.raises(PortTaken, match="--metrics-port 9401: cannot listen on 198.51.100.77"):
        check_free({"--metrics-port": ("198.51.100.77", 9401)})  # TEST-NET-2: never local
