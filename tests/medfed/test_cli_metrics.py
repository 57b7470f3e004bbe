"""`medfed simulate --metrics-port`: the dashboard is up while the run goes, gone after it."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import EXIT_BAD_INPUT, app
from tests.medfed.helpers import fetch, free_port, samples

runner = CliRunner()


@pytest.mark.slow
def test_simulate_serves_metrics_while_it_runs_and_frees_the_port(
    small_hospitals: Path, tmp_path: Path
) -> None:
    port = free_port()
    run_dir = tmp_path / "run"
    log = tmp_path / "medfed.log"
    cmd = [
        sys.executable, "-m", "medfed", "simulate", "--data", str(small_hospitals / "sites"),
        "--test-data", str(small_hospitals / "test"), "--out", str(run_dir), "--rounds", "2",
        "--local-steps", "2", "--no-dp", "--image-size", "32", "--batch-size", "8",
        "--metrics-port", str(port),
    ]
    scrapes: list[str] = []
    states: list[dict] = []
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.monotonic() + 240
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    scrape = fetch(f"http://127.0.0.1:{port}/metrics", timeout=2)
                    state = json.loads(fetch(f"http://127.0.0.1:{port}/api/state", 2))
                    scrapes.append(scrape)
                    states.append(state)
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass  # not up yet, or already stopped
                time.sleep(0.25)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert f"dashboard: http://127.0.0.1:{port}/" in output
    assert scrapes, "the dashboard never answered during the run"

    results = json.loads((run_dir / "results.json").read_text())
    run_key = results["config"]["run-key"]
    rounds_seen = [samples(t)[("medfed_round", frozenset())] for t in scrapes]
    assert rounds_seen == sorted(rounds_seen) and max(rounds_seen) >= 1
    last = samples(scrapes[-1])
    info = {dict(lbls)["run_id"] for name, lbls in last if name == "medfed_run_info"}
    assert info == {run_key}  # the dashboard names the run results.json describes
    # each page state was read just after its scrape: the same round, or one that ended between
    state_rounds = [s["run"]["round"] for s in states]
    assert all(0 <= s - int(r) <= 1 for s, r in zip(state_rounds, rounds_seen, strict=True))
    assert state_rounds == sorted(state_rounds)
    assert [site["name"] for site in states[-1]["sites"]] == ["site-a", "site-b", "site-c"]
    # without DP there is no epsilon to report: no series rather than a misleading 0
    assert not [name for t in scrapes for name, _ in samples(t) if name.startswith("medfed_priv")]
    assert all(site["epsilon"] is None for site in states[-1]["sites"])

    # the process stopped its server: nothing answers and the port can be listened on again
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with socket.socket() as again:
        # as every server does: our scrapes left the port's old connections in TIME_WAIT
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()


def test_a_busy_metrics_port_is_bad_input_naming_the_flag(
    small_hospitals: Path, tmp_path: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(
            app,
            ["simulate", "--data", str(small_hospitals / "sites"), "--out", str(tmp_path / "r"),
             "--metrics-port", str(port)],
        )
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert f"--metrics-port {port}" in result.output and "already in use" in result.output
    assert "--metrics-port 0" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r" / "results.json").exists()


def test_metrics_port_out_of_range_is_a_usage_error(small_hospitals: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["simulate", "--data", str(small_hospitals / "sites"), "--out", str(tmp_path / "r"),
         "--metrics-port", "70000"],
    )
    assert result.exit_code == EXIT_BAD_INPUT
    assert "--metrics-port" in result.output
