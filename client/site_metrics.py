"""`medfed site --metrics-port`: the hospital's own Prometheus metrics.

What this site did in its latest run (rounds trained, time and loss of the last local training,
privacy spent against the run's budget), whether its SuperNode is running, and, where an NVIDIA
GPU is present, the GPU's memory and utilisation as `nvidia-smi` reports them (device-wide: the
ClientApp trains in a short-lived process of its own, so no in-process counter would see it).
Series are computed when Prometheus scrapes, from the site's progress file.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from client import progress
from common.metrics_endpoint import MetricsSettings
from common.ports import PortTaken, free_port_after

log = logging.getLogger("medfed.site")

NVIDIA_SMI_QUERY = "index,memory.used,memory.total,utilization.gpu"


@dataclass(frozen=True)
class GpuReading:
    """One GPU as nvidia-smi reports it."""

    index: str
    memory_used_bytes: float
    memory_total_bytes: float
    utilization: float  # 0..1


def parse_nvidia_smi(text: str) -> list[GpuReading]:
    """Parse nvidia-smi's CSV (`--format=csv,noheader,nounits`: MiB and percent).

    Lines it cannot read (e.g. "[N/A]" utilisation) are skipped.
    """
    readings = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            used, total, util = (float(p) for p in parts[1:])
        except ValueError:
            continue  # "[N/A]" on some boards
        readings.append(GpuReading(parts[0], used * 2**20, total * 2**20, util / 100))
    return readings


def read_gpus(timeout: float = 5.0) -> list[GpuReading]:
    """The GPUs nvidia-smi sees; empty without an NVIDIA driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv
            [exe, f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=timeout, check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("nvidia-smi failed: %s", exc)
        return []
    return parse_nvidia_smi(done.stdout)


class SiteCollector(Collector):
    """Prometheus collector of one site's training progress, liveness and GPUs."""

    def __init__(
        self,
        site: str,
        state_dir: Path,
        *,
        running: Callable[[], bool],
        gpus: Callable[[], list[GpuReading]] = read_gpus,
    ) -> None:
        self.site, self.state_dir, self.running, self.gpus = site, state_dir, running, gpus

    def collect(self) -> Iterator[Any]:
        """The series, computed now."""
        labels = ["site"]
        up = GaugeMetricFamily(
            "medfed_site_up", "1 while the site's SuperNode process runs.", labels=labels
        )
        up.add_metric([self.site], 1.0 if self.running() else 0.0)
        yield up

        entries = progress.read(self.state_dir)
        run = str(entries[-1]["run"]) if entries else ""
        latest = [e for e in entries if str(e["run"]) == run]
        trained = [e for e in latest if e["phase"] == "train"]
        evaluated = [e for e in latest if e["phase"] == "evaluate"]
        run_labels = ["site", "run"]
        rounds = CounterMetricFamily(
            "medfed_site_rounds_trained", "Rounds this site trained in its latest run.",
            labels=run_labels,
        )
        evals = CounterMetricFamily(
            "medfed_site_evaluations", "Evaluations of the global model in the latest run.",
            labels=run_labels,
        )
        if run:
            rounds.add_metric([self.site, run], float(len(trained)))
            evals.add_metric([self.site, run], float(len(evaluated)))
        yield rounds
        yield evals

        last = trained[-1] if trained else None
        gauges = {
            "medfed_site_last_round": ("Round of the latest local training.", "round"),
            "medfed_site_train_seconds": ("Seconds of the latest local training.", "seconds"),
            "medfed_site_train_loss": ("Loss of the latest local training.", "loss"),
            "medfed_site_train_examples": ("Examples the latest training used.", "examples"),
            "medfed_site_privacy_epsilon": ("Epsilon spent in the latest run.", "epsilon"),
            "medfed_site_privacy_budget_epsilon": ("The latest run's epsilon budget.",
                                                   "target_epsilon"),
            "medfed_site_last_activity_timestamp_seconds": ("When it last trained (Unix time).",
                                                            "at"),
        }
        for name, (doc, key) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=run_labels)
            value = last.get(key) if last else None
            if isinstance(value, int | float):
                family.add_metric([self.site, run], float(value))
            yield family

        gpus = self.gpus()
        mem = GaugeMetricFamily(
            "medfed_site_gpu_memory_used_bytes", "GPU memory in use (nvidia-smi).",
            labels=["site", "gpu"],
        )
        total = GaugeMetricFamily(
            "medfed_site_gpu_memory_total_bytes", "GPU memory (nvidia-smi).",
            labels=["site", "gpu"],
        )
        util = GaugeMetricFamily(
            "medfed_site_gpu_utilization_ratio", "GPU utilisation, 0 to 1 (nvidia-smi).",
            labels=["site", "gpu"],
        )
        for gpu in gpus:
            mem.add_metric([self.site, gpu.index], gpu.memory_used_bytes)
            total.add_metric([self.site, gpu.index], gpu.memory_total_bytes)
            util.add_metric([self.site, gpu.index], gpu.utilization)
        yield mem
        yield total
        yield util


def serve_site_metrics(collector: SiteCollector, *, host: str, port: int) -> Callable[[], None]:
    """Serve /metrics for `collector` on host:port; returns a function that stops it."""
    MetricsSettings(port=port, host=host)  # the same checks and messages as the aggregator's
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        # taken since `medfed site` checked it (common.ports), or a host it cannot bind
        free = free_port_after(host, port)
        fix = (
            f"pass --metrics-port {free} ({free} is free now)" if free is not None
            else f"--metrics-host {host} is not an address of this machine: use e.g. 127.0.0.1"
        )
        raise PortTaken(
            f"--metrics-port {port}: cannot listen on {host}:{port} ({exc.strerror}); {fix}, or "
            "--metrics-port 0 to run without site metrics"
        ) from None

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
