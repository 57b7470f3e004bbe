"""The exporter's HTTP server: routes, the shipped dashboard, ports and clean shutdown."""

import json
import socket
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from common.config import RunConfig
from server.exporter import MetricsPortError, MetricsServer, MetricsSettings, serve_metrics
from server.metrics import RunMetrics

ROOT = Path(__file__).resolve().parents[2]


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


@pytest.fixture
def server():
    metrics = RunMetrics()
    metrics.start_run(run_id="r1", task="classify", strategy="fedavg", total_rounds=3, dp=False,
                      sites=["hospital-01"])
    with MetricsServer(metrics, port=0) as srv:
        yield srv


def test_routes(server: MetricsServer) -> None:
    status, kind, body = _get(server.url + "metrics")
    assert status == 200 and kind.startswith("text/plain")
    assert 'medfed_run_info{run_id="r1",strategy="fedavg",task="classify"} 1.0' in body
    assert "medfed_rounds_total 3.0" in body

    status, kind, body = _get(server.url + "api/state")
    state = json.loads(body)
    assert kind == "application/json"
    assert state["run"]["run_id"] == "r1" and state["sites"][0]["name"] == "hospital-01"

    status, kind, page = _get(server.url)
    assert kind.startswith("text/html") and 'id="round"' in page
    # everything the page loads comes from this server: no CDN on a hospital network
    assert "http://" not in page and "https://" not in page
    for asset, expected in (("app.js", "text/javascript"), ("style.css", "text/css")):
        status, kind, body = _get(server.url + asset)
        assert status == 200 and kind.startswith(expected) and body
        assert "https://" not in body

    with pytest.raises(urllib.error.HTTPError) as missing:
        _get(server.url + "etc/passwd")
    assert missing.value.code == 404


def test_a_busy_port_names_the_flag_and_the_fix() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(MetricsPortError, match=f"--metrics-port {port}.*already in use") as e:
            MetricsServer(RunMetrics(), port=port).start()
        assert "--metrics-port 0" in str(e.value)


def test_stop_releases_the_port() -> None:
    srv = MetricsServer(RunMetrics(), port=0).start()
    port = srv.port
    srv.stop()
    srv.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        _get(f"http://127.0.0.1:{port}/metrics")
    MetricsServer(RunMetrics(), port=port).start().stop()  # the port can be served again


def test_port_zero_in_settings_means_off() -> None:
    with serve_metrics(MetricsSettings(port=0)) as srv:
        assert srv is None


@pytest.mark.parametrize("port", [-1, 70000])
def test_settings_reject_impossible_ports(port: int) -> None:
    with pytest.raises(MetricsPortError, match="metrics-port must be between 0"):
        MetricsSettings(port=port)


def test_flower_run_config_keeps_metrics_out_of_run_config() -> None:
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    settings, rest = MetricsSettings.split_run_config(defaults)
    assert settings == MetricsSettings(port=0, host="127.0.0.1")  # `flwr run .`: off by default
    assert RunConfig.from_mapping(rest).rounds == defaults["rounds"]
    settings, _ = MetricsSettings.split_run_config({**defaults, "metrics-port": "9500"})
    assert settings.port == 9500
    with pytest.raises(MetricsPortError, match="metrics-port must be a whole number"):
        MetricsSettings.split_run_config({"metrics-port": "auto"})


def test_dashboard_assets_ship_with_the_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["server"]
    shipped = {p.name for pattern in patterns for p in (ROOT / "server").glob(pattern)}
    assert {"index.html", "app.js", "style.css"} <= shipped
