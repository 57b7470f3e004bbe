import json
import os
from pathlib import Path

from server.exporter import MetricsSettings
from server.watch import RunWatcher
from tests.medfed.helpers import fetch, free_port, samples


def _entry(rnd: int, eps: float) -> dict:
    return {
        "round": rnd, "central": None,
        "federated": {"train": {}, "evaluate": {"auc": 0.5 + rnd / 10}, "sites": {}},
        "sampled": ["a", "b"], "participants": ["a", "b"], "failures": [],
        "duration_s": 3.0, "finished_at": 1.0, "sites_connected": 2,
        "privacy": {"a": {"epsilon": eps, "target_epsilon": 8.0}}, "update_bytes": {},
    }


def _write(run: Path, rounds: list[dict], total: int, mtime: float) -> None:
    run.mkdir(parents=True, exist_ok=True)
    config = {"rounds": total, "task": "classify", "strategy": "fedavg", "dp": True,
              "target-epsilon": 8.0}
    (run / "results.json").write_text(json.dumps({"config": config, "rounds": rounds}))
    os.utime(run / "results.json", (mtime, mtime))


def test_the_exporter_follows_the_newest_deployed_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    watcher = RunWatcher(runs, MetricsSettings(port=free_port()), sites=["a", "b"])
    watcher.start()
    try:
        url = f"{watcher.url}metrics"
        watcher.poll()  # no run yet: nothing to show, nothing breaks
        _write(runs / "111", [_entry(1, 2.0)], total=3, mtime=1_000)
        watcher.poll()
        values = samples(fetch(url))
        assert values[("medfed_round", frozenset())] == 1.0
        assert values[("medfed_privacy_epsilon", frozenset({("site", "a")}))] == 2.0
        _write(runs / "111", [_entry(1, 2.0), _entry(2, 5.0)], total=3, mtime=2_000)
        watcher.poll()
        values = samples(fetch(url))
        assert values[("medfed_round", frozenset())] == 2.0
        assert values[("medfed_round_duration_seconds_count", frozenset())] == 2.0
        # a newer run replaces the old one's series
        _write(runs / "222", [], total=5, mtime=3_000)
        watcher.poll()
        values = samples(fetch(url))
        info = ("medfed_run_info", frozenset(
            {("run_id", "222"), ("task", "classify"), ("strategy", "fedavg")}))
        assert values[info] == 1.0
        assert values[("medfed_rounds_total", frozenset())] == 5.0
        assert ("medfed_privacy_epsilon", frozenset({("site", "a")})) not in values
        state = json.loads(fetch(f"{watcher.url}api/state"))
        assert {s["name"] for s in state["sites"]} == {"a", "b"}
    finally:
        watcher.stop()
