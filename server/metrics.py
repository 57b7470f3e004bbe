"""Prometheus metrics and a dashboard snapshot of one federated run, fed round by round.

The aggregator (`medfed simulate` now; a deployed server reuses it) creates one `RunMetrics`,
announces the run with `start_run` and hands it every round's entry (`observe`, which fits the
`on_round` callback of `server.run.run_federation`). The metrics live in the object's own
`CollectorRegistry`, never the process-wide one, so two runs in one process (tests, a notebook)
do not collide. `snapshot()` is the same information as plain JSON for the dashboard.

Labels carry site names and metric names only: never a file path, a header value or anything
read from an image. A site name that is not a safe name (see `common.sites`) is exported as
`unknown`.

Metric names of per-site values (`medfed_site_metric{name}`): the site's training report gets a
`train_` prefix (`train_loss`, `train_seconds`, `train_steps`, `train_num_examples`,
`train_epsilon`), its validation of the global model a `val_` prefix (`val_auc`, `val_loss`, ...).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from common.sites import is_safe_site_name
from server.run import RoundUpdate

log = logging.getLogger("medfed.server")

# Round durations range from seconds (a simulation on a laptop) to an hour (a deployed
# federation waiting for slow sites).
ROUND_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

# Counts, not quality measures: kept out of the global curves.
_NOT_GLOBAL = {"num-examples"}


def _label(site: str) -> str:
    if site == "*":  # a failure of the whole round, not of one site
        return "all"
    return site if is_safe_site_name(site) else "unknown"


def _metric_name(prefix: str, key: str) -> str:
    key = key.replace("-", "_")
    return key if key.startswith(prefix) else prefix + key


def _finite(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


@dataclass
class SiteState:
    """What the dashboard's per-site table shows for one site."""

    name: str
    last_seen_round: int | None = None
    last_seen_at: float | None = None
    rounds_joined: int = 0
    train_seconds_last: float | None = None
    train_seconds_total: float = 0.0
    epsilon: float | None = None
    budget_epsilon: float | None = None
    failures: int = 0
    last_failure: str | None = None
    val_auc: float | None = None
    bytes_down: int = 0
    bytes_up: int = 0


@dataclass
class RunState:
    """The run as a whole, for the dashboard's header and progress bar."""

    run_id: str = ""
    task: str = ""
    strategy: str = ""
    dp: bool = False
    target_epsilon: float | None = None
    total_rounds: int = 0
    round: int = 0
    status: str = "starting"
    started_at: float = field(default_factory=time.time)
    sites_connected: int | None = None
    sites_participating: int | None = None


class RunMetrics:
    """The Prometheus series and the dashboard state of one run."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.run_info = Gauge(
            "medfed_run_info", "The run this aggregator trains (value 1).",
            ["run_id", "task", "strategy"], registry=reg,
        )
        self.round = Gauge("medfed_round", "Last completed federated round.", registry=reg)
        self.rounds_total = Gauge(
            "medfed_rounds_total", "Rounds the run is configured to train.", registry=reg
        )
        self.round_duration = Histogram(
            "medfed_round_duration_seconds",
            "Wall-clock time of a round: sending the model, local training, aggregation, "
            "evaluation.",
            buckets=ROUND_BUCKETS, registry=reg,
        )
        self.sites_connected = Gauge(
            "medfed_sites_connected", "Sites connected to the aggregator in the last round.",
            registry=reg,
        )
        self.sites_participating = Gauge(
            "medfed_sites_participating",
            "Sites whose training update reached the aggregator in the last round.",
            registry=reg,
        )
        self.site_failures = Counter(
            "medfed_site_failures",
            "Failed site replies, by site and reason (train_error, train_timeout, train_refused "
            "(the site's privacy budget), "
            "evaluate_error, evaluate_timeout, aggregate_error).",
            ["site", "reason"], registry=reg,
        )
        self.global_metric = Gauge(
            "medfed_global_metric",
            "The global model's metrics after the last round (central test set, else the "
            "sites' aggregated validation).",
            ["name"], registry=reg,
        )
        self.site_metric = Gauge(
            "medfed_site_metric",
            "A site's last reported value: train_* from its local training, val_* from its "
            "validation of the global model.",
            ["site", "name"], registry=reg,
        )
        self.site_train_seconds = Gauge(
            "medfed_site_train_seconds", "Seconds of the site's last local training.",
            ["site"], registry=reg,
        )
        self.privacy_epsilon = Gauge(
            "medfed_privacy_epsilon",
            "Cumulative DP epsilon the site has spent in this run (its own accountant).",
            ["site"], registry=reg,
        )
        self.privacy_budget = Gauge(
            "medfed_privacy_budget_epsilon", "The site's epsilon budget for the whole run.",
            ["site"], registry=reg,
        )
        self.update_bytes = Counter(
            "medfed_update_bytes",
            "Model bytes exchanged with a site: down = global model sent to it, up = update "
            "it sent back.",
            ["site", "direction"], registry=reg,
        )
        self._lock = threading.Lock()
        self._run = RunState()
        self._sites: dict[str, SiteState] = {}
        self._history: list[dict[str, Any]] = []

    # --- feeding ----------------------------------------------------------------------------

    def start_run(
        self,
        *,
        run_id: str,
        task: str,
        strategy: str,
        total_rounds: int,
        dp: bool,
        target_epsilon: float | None = None,
        sites: Iterable[str] = (),
    ) -> None:
        """Announce the run; `sites` are the sites expected to join (shown before round 1)."""
        self.run_info.labels(run_id=run_id, task=task, strategy=strategy).set(1)
        self.rounds_total.set(total_rounds)
        with self._lock:
            self._run = RunState(
                run_id=run_id, task=task, strategy=strategy, dp=dp,
                target_epsilon=target_epsilon if dp else None, total_rounds=total_rounds,
                status="waiting for round 1",
            )
            for name in sites:
                self._site(_label(name))

    def observe(self, update: RoundUpdate) -> None:
        """Fold one round's entry (see `server.record.RunRecord.add_round`) into the metrics."""
        entry = update.entry
        with self._lock:
            self._run.total_rounds = update.total_rounds
            self.rounds_total.set(update.total_rounds)
            try:
                self._observe_round(entry)
            except (KeyError, TypeError, ValueError, AttributeError):
                # Monitoring must never stop a federation: a malformed entry costs a round of
                # metrics, not the run.
                log.warning("metrics: could not read round %s", entry.get("round"), exc_info=True)
            self._run.round = update.round
            finished = self._run.round >= self._run.total_rounds
            self._run.status = "finishing" if finished else "running"

    def replay(self, rounds: Iterable[Mapping[str, Any]], total_rounds: int) -> None:
        """Observe rounds recorded before a resume, so counters and curves start at round 1."""
        for entry in rounds:
            self.observe(RoundUpdate(int(entry["round"]), total_rounds, dict(entry)))

    def finish(self, *, ok: bool) -> None:
        """Mark the run finished (or failed) for the dashboard."""
        with self._lock:
            self._run.status = "finished" if ok else "failed"

    def _site(self, name: str) -> SiteState:
        if name not in self._sites:
            self._sites[name] = SiteState(name)
        return self._sites[name]

    def _observe_round(self, entry: Mapping[str, Any]) -> None:
        rnd = int(entry["round"])
        seen_at = float(entry.get("finished_at") or time.time())
        self.round.set(rnd)
        duration = _finite(entry.get("duration_s"))
        if duration is not None:
            self.round_duration.observe(duration)

        participants = [_label(s) for s in entry.get("participants", [])]
        self.sites_participating.set(len(participants))
        self._run.sites_participating = len(participants)
        connected = entry.get("sites_connected")
        if connected is not None:
            self.sites_connected.set(int(connected))
            self._run.sites_connected = int(connected)

        central = entry.get("central")
        source, values = (
            ("central", central) if central else ("federated", entry["federated"]["evaluate"])
        )
        global_values: dict[str, float | None] = {}
        for key, value in (values or {}).items():
            if key in _NOT_GLOBAL:
                continue
            name = key.replace("-", "_")
            number = _finite(value)
            self.global_metric.labels(name=name).set(math.nan if number is None else number)
            global_values[name] = number
        self._history.append(
            {
                "round": rnd, "source": source, "metrics": global_values,
                "duration_s": duration, "participants": len(participants),
                "warnings": list(entry.get("warnings") or []),  # a one-class model, say
            }
        )

        for raw, reports in entry["federated"]["sites"].items():
            site = self._site(_label(raw))
            site.last_seen_round, site.last_seen_at = rnd, seen_at
            for prefix, stage in (("train_", "train"), ("val_", "evaluate")):
                for key, value in (reports.get(stage) or {}).items():
                    number = _finite(value)
                    self.site_metric.labels(site=site.name, name=_metric_name(prefix, key)).set(
                        math.nan if number is None else number
                    )
            train = reports.get("train") or {}
            seconds = _finite(train.get("train-seconds"))
            if seconds is not None:
                self.site_train_seconds.labels(site=site.name).set(seconds)
                site.train_seconds_last = seconds
                site.train_seconds_total += seconds
            site.val_auc = _finite((reports.get("evaluate") or {}).get("auc"))
        for name in participants:
            self._site(name).rounds_joined += 1

        for raw, report in (entry.get("privacy") or {}).items():
            site = self._site(_label(raw))
            epsilon = _finite(report.get("epsilon"))
            budget = _finite(report.get("target_epsilon", self._run.target_epsilon))
            if epsilon is not None:
                self.privacy_epsilon.labels(site=site.name).set(epsilon)
                site.epsilon = epsilon
            if budget is not None:
                self.privacy_budget.labels(site=site.name).set(budget)
                site.budget_epsilon = budget

        for failure in entry.get("failures", []):
            site = self._site(_label(str(failure.get("site", "*"))))
            stage = str(failure.get("stage", "train"))
            kind = failure.get("kind") or (
                "timeout" if "timeout" in str(failure.get("reason", "")) else "error"
            )
            self.site_failures.labels(site=site.name, reason=f"{stage}_{kind}").inc()
            site.failures += 1
            site.last_failure = f"round {rnd}: {stage} {kind}"

        for raw, directions in (entry.get("update_bytes") or {}).items():
            site = self._site(_label(raw))
            for direction in ("down", "up"):
                count = int(directions.get(direction, 0))
                if count:
                    self.update_bytes.labels(site=site.name, direction=direction).inc(count)
            site.bytes_down += int(directions.get("down", 0))
            site.bytes_up += int(directions.get("up", 0))

    # --- reading ----------------------------------------------------------------------------

    def prometheus_text(self) -> bytes:
        """The registry in Prometheus's text exposition format."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """The dashboard's view: run, progress, global metrics per round and the site table."""
        with self._lock:
            return {
                "now": time.time(),
                "run": asdict(self._run),
                "history": [dict(h) for h in self._history],
                "sites": [asdict(s) for _, s in sorted(self._sites.items())],
            }
