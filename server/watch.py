"""The deployed aggregator's dashboard and /metrics: `medfed server` follows its runs' folders.

A deployed run's ServerApp lives in a subprocess of the SuperLink, started and ended per run;
the exporter lives in `medfed server` instead, so Prometheus always finds it. It learns what
happens from the run folder the ServerApp writes after every round (`STATE/runs/<id>/results.json`)
and shows the newest run, as `medfed simulate` shows its one run.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.exporter import MetricsServer, MetricsSettings
from server.metrics import RunMetrics
from server.record import MODEL, RESULTS
from server.run import RoundUpdate

log = logging.getLogger("medfed.server")
POLL_S = 2.0


class RunWatcher:
    """Feed the exporter from the newest run folder under `runs_dir`."""

    def __init__(
        self, runs_dir: Path, settings: MetricsSettings, sites: Sequence[str] = ()
    ) -> None:
        self.runs_dir, self.settings, self.sites = runs_dir, settings, tuple(sites)
        self.server: MetricsServer | None = None
        self._current: Path | None = None
        self._seen_rounds = 0
        self._finished = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str | None:
        """The dashboard address, or None when metrics are off."""
        return self.server.url if self.server else None

    def start(self) -> None:
        """Listen (raises MetricsPortError naming --metrics-port) and start following runs."""
        if self.settings.port == 0:
            return
        self.server = MetricsServer(
            RunMetrics(), host=self.settings.host, port=self.settings.port, flag="--metrics-port"
        ).start()
        self._thread = threading.Thread(target=self._loop, name="medfed-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following runs and release the port."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.server is not None:
            self.server.stop()

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - monitoring never stops the aggregator
                log.warning("dashboard: could not read the run folder", exc_info=True)

    def _newest(self) -> Path | None:
        found = [p for p in self.runs_dir.glob(f"*/{RESULTS}") if p.is_file()]
        return max(found, key=lambda p: p.stat().st_mtime).parent if found else None

    def poll(self) -> None:
        """Fold whatever the newest run wrote since the last poll into the metrics."""
        if self.server is None:
            return
        run_dir = self._newest()
        if run_dir is None:
            return
        try:
            results: dict[str, Any] = json.loads((run_dir / RESULTS).read_text())
        except (OSError, ValueError):
            return  # being rewritten; the next poll reads it whole
        cfg = results.get("config", {})
        total = int(cfg.get("rounds", 0))
        if run_dir != self._current:
            metrics = RunMetrics()
            metrics.start_run(
                run_id=run_dir.name, task=str(cfg.get("task", "")),
                strategy=str(cfg.get("strategy", "")), total_rounds=total,
                dp=bool(cfg.get("dp", False)), target_epsilon=cfg.get("target-epsilon"),
                sites=self.sites,
            )
            self.server.use(metrics)
            self._current, self._seen_rounds, self._finished = run_dir, 0, False
        metrics = self.server.metrics
        rounds = results.get("rounds", [])
        for entry in rounds[self._seen_rounds:]:
            metrics.observe(RoundUpdate(int(entry["round"]), total, entry))
        self._seen_rounds = len(rounds)
        if not self._finished and (run_dir / MODEL).is_file() and self._seen_rounds >= total:
            metrics.finish(ok=True)
            self._finished = True
