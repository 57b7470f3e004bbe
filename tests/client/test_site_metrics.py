import urllib.request
from pathlib import Path

import pytest

from client import progress
from client.site_metrics import GpuReading, SiteCollector, parse_nvidia_smi, serve_site_metrics
from tests.medfed.helpers import free_port, samples


def test_parse_nvidia_smi_reads_mib_and_percent() -> None:
    text = "0, 1024, 81920, 37\n1, 0, 81920, [N/A]\ngarbage\n"
    assert parse_nvidia_smi(text) == [GpuReading("0", 1024 * 2**20, 81920 * 2**20, 0.37)]


def _collector(state: Path, gpus: list[GpuReading], running: bool = True) -> SiteCollector:
    return SiteCollector("site-a", state, running=lambda: running, gpus=lambda: gpus)


def test_site_series_follow_the_latest_run(tmp_path: Path) -> None:
    progress.record(tmp_path, progress.Progress("old", 1, "train", 1.0, 0.9, 10, 1.0, 8.0))
    for rnd, eps in [(1, 2.5), (2, 4.0)]:
        progress.record(tmp_path, progress.Progress("r2", rnd, "train", 3.0, 0.5, 40, eps, 6.0))
        progress.record(tmp_path, progress.Progress("r2", rnd, "evaluate", 0.2, 0.4, 10))
    gpu = GpuReading("0", 2.0e9, 8.0e9, 0.5)
    port = free_port()
    stop = serve_site_metrics(_collector(tmp_path, [gpu]), host="127.0.0.1", port=port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            values = samples(r.read().decode())
    finally:
        stop()
    run = frozenset({("site", "site-a"), ("run", "r2")})
    assert values[("medfed_site_rounds_trained_total", run)] == 2.0
    assert values[("medfed_site_evaluations_total", run)] == 2.0
    assert values[("medfed_site_last_round", run)] == 2.0
    assert values[("medfed_site_privacy_epsilon", run)] == 4.0
    assert values[("medfed_site_privacy_budget_epsilon", run)] == 6.0
    assert values[("medfed_site_train_examples", run)] == 40.0
    assert values[("medfed_site_up", frozenset({("site", "site-a")}))] == 1.0
    g = frozenset({("site", "site-a"), ("gpu", "0")})
    assert values[("medfed_site_gpu_memory_used_bytes", g)] == 2.0e9
    assert values[("medfed_site_gpu_utilization_ratio", g)] == 0.5


def test_a_site_that_never_trained_has_no_run_series_and_no_gpu(tmp_path: Path) -> None:
    families = {f.name: f for f in _collector(tmp_path, [], running=False).collect()}
    assert families["medfed_site_up"].samples[0].value == 0.0
    assert families["medfed_site_rounds_trained"].samples == []
    assert families["medfed_site_gpu_memory_used_bytes"].samples == []


def test_progress_file_skips_damaged_lines(tmp_path: Path) -> None:
    progress.record(tmp_path, progress.Progress("r", 1, "train", 1.0, 0.5, 4))
    with (tmp_path / progress.FILE).open("a") as f:
        f.write("{not json\n")
    assert [e["round"] for e in progress.read(tmp_path)] == [1]


def test_busy_metrics_port_is_named(tmp_path: Path) -> None:
    port = free_port()
    stop = serve_site_metrics(_collector(tmp_path, []), host="127.0.0.1", port=port)
    try:
        with pytest.raises(ValueError, match=f"--metrics-port {port}"):
            serve_site_metrics(_collector(tmp_path, []), host="127.0.0.1", port=port)
    finally:
        stop()
