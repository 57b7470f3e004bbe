"""RunMetrics: each round's entry becomes the right Prometheus series and dashboard rows."""

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import RunMetrics
from server.run import RoundUpdate


def _entry(rnd: int, *, central: dict | None = None, failures: list | None = None) -> dict:
    sites = {
        "h1": {
            "train": {"train-loss": 0.7, "num-examples": 40.0, "train-seconds": 1.5, "steps": 4.0,
                      "epsilon": 2.0 * rnd},
            "evaluate": {"auc": 0.6 + rnd / 10, "loss": 0.5, "num-examples": 10.0},
        },
        "h2": {
            "train": {"train-loss": 0.9, "num-examples": 20.0, "train-seconds": 0.5, "steps": 2.0,
                      "epsilon": 1.0 * rnd},
            "evaluate": {"auc": math.nan, "loss": 0.8, "num-examples": 5.0},
        },
    }
    return {
        "round": rnd,
        "central": central,
        "federated": {
            "train": {"train-loss": 0.8},
            "evaluate": {"auc": 0.65, "loss": 0.6, "num-examples": 15.0},
            "sites": sites,
        },
        "sampled": ["h1", "h2", "h3"],
        "participants": ["h1", "h2"],
        "failures": failures or [],
        "duration_s": 3.0 * rnd,
        "finished_at": 1000.0 + rnd,
        "sites_connected": 3,
        "privacy": {
            "h1": {"epsilon": 2.0 * rnd, "target_epsilon": 8.0, "steps": 4 * rnd},
            "h2": {"epsilon": 1.0 * rnd, "target_epsilon": 6.0, "steps": 2 * rnd},
        },
        "update_bytes": {"h1": {"down": 200, "up": 100}, "h2": {"down": 200, "up": 100},
                         "h3": {"down": 100, "up": 0}},
    }


def _samples(metrics: RunMetrics) -> dict[tuple[str, frozenset], float]:
    text = metrics.prometheus_text().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict, series: str, **labels: str) -> float:
    return samples[(series, frozenset(labels.items()))]


@pytest.fixture
def metrics() -> RunMetrics:
    m = RunMetrics()
    m.start_run(run_id="abc", task="classify", strategy="fedavg", total_rounds=5, dp=True,
                target_epsilon=8.0, sites=["h1", "h2", "h3"])
    return m


def test_rounds_become_series(metrics: RunMetrics) -> None:
    central = {"auc": 0.71, "accuracy": 0.6, "loss": 0.55, "num-examples": 80.0}
    failure = {"site": "h3", "stage": "train", "kind": "timeout",
               "reason": "no reply before the round timeout"}
    metrics.observe(RoundUpdate(1, 5, _entry(1, failures=[failure])))
    metrics.observe(RoundUpdate(2, 5, _entry(2, central=central, failures=[failure])))
    s = _samples(metrics)

    assert _value(s, "medfed_run_info", run_id="abc", task="classify", strategy="fedavg") == 1
    assert _value(s, "medfed_round") == 2
    assert _value(s, "medfed_rounds_total") == 5
    assert _value(s, "medfed_round_duration_seconds_count") == 2
    assert _value(s, "medfed_round_duration_seconds_sum") == pytest.approx(9.0)
    assert _value(s, "medfed_round_duration_seconds_bucket", le="5.0") == 1
    assert _value(s, "medfed_sites_connected") == 3
    assert _value(s, "medfed_sites_participating") == 2
    assert _value(s, "medfed_site_failures_total", site="h3", reason="train_timeout") == 2
    # central metrics win over federated ones; counts are not quality metrics
    assert _value(s, "medfed_global_metric", name="auc") == pytest.approx(0.71)
    assert ("medfed_global_metric", frozenset({("name", "num_examples")})) not in s
    assert _value(s, "medfed_site_metric", site="h1", name="train_loss") == pytest.approx(0.7)
    assert _value(s, "medfed_site_metric", site="h1", name="train_num_examples") == 40
    assert _value(s, "medfed_site_metric", site="h1", name="val_auc") == pytest.approx(0.8)
    assert math.isnan(_value(s, "medfed_site_metric", site="h2", name="val_auc"))
    assert _value(s, "medfed_site_train_seconds", site="h1") == pytest.approx(1.5)
    assert _value(s, "medfed_privacy_epsilon", site="h1") == pytest.approx(4.0)
    assert _value(s, "medfed_privacy_budget_epsilon", site="h2") == pytest.approx(6.0)
    # counters add up over rounds
    assert _value(s, "medfed_update_bytes_total", site="h1", direction="down") == 400
    assert _value(s, "medfed_update_bytes_total", site="h1", direction="up") == 200
    assert _value(s, "medfed_update_bytes_total", site="h3", direction="down") == 200


def test_without_central_the_federated_evaluation_is_global(metrics: RunMetrics) -> None:
    metrics.observe(RoundUpdate(1, 5, _entry(1)))
    s = _samples(metrics)
    assert _value(s, "medfed_global_metric", name="auc") == pytest.approx(0.65)
    assert metrics.snapshot()["history"][0]["source"] == "federated"


def test_snapshot_feeds_the_dashboard(metrics: RunMetrics) -> None:
    before = metrics.snapshot()
    assert before["run"]["status"] == "waiting for round 1"
    assert [site["name"] for site in before["sites"]] == ["h1", "h2", "h3"]
    assert before["sites"][0]["last_seen_round"] is None

    failure = {"site": "h3", "stage": "evaluate", "kind": "error", "reason": "crashed"}
    metrics.observe(RoundUpdate(1, 5, _entry(1, failures=[failure])))
    metrics.observe(RoundUpdate(2, 5, _entry(2)))
    snap = metrics.snapshot()
    assert snap["run"]["round"] == 2 and snap["run"]["total_rounds"] == 5
    assert snap["run"]["status"] == "running"
    assert [h["round"] for h in snap["history"]] == [1, 2]
    assert snap["history"][1]["metrics"]["auc"] == pytest.approx(0.65)
    h1, h2, h3 = snap["sites"]
    assert (h1["last_seen_round"], h1["last_seen_at"], h1["rounds_joined"]) == (2, 1002.0, 2)
    assert h1["train_seconds_total"] == pytest.approx(3.0)
    assert (h1["epsilon"], h1["budget_epsilon"]) == (4.0, 8.0)
    assert h2["val_auc"] is None  # NaN is no value, and JSON has no NaN
    assert (h3["failures"], h3["rounds_joined"], h3["last_seen_round"]) == (1, 0, None)
    assert h3["last_failure"] == "round 1: evaluate error"
    metrics.finish(ok=True)
    assert metrics.snapshot()["run"]["status"] == "finished"


def test_labels_never_carry_paths_or_free_text(metrics: RunMetrics) -> None:
    entry = _entry(1)
    entry["federated"]["sites"]["/data/patients/Doe^John"] = entry["federated"]["sites"].pop("h2")
    entry["failures"] = [
        {"site": "*", "stage": "aggregate", "kind": "error",
         "reason": "no update could be aggregated from /srv/site/scan_017.dcm"},
    ]
    metrics.observe(RoundUpdate(1, 5, entry))
    text = metrics.prometheus_text().decode()
    assert "/data" not in text and "Doe" not in text and "scan_017" not in text
    s = _samples(metrics)
    assert _value(s, "medfed_site_metric", site="unknown", name="train_loss") == pytest.approx(0.9)
    assert _value(s, "medfed_site_failures_total", site="all", reason="aggregate_error") == 1


def test_a_malformed_entry_costs_metrics_not_the_run(metrics: RunMetrics) -> None:
    metrics.observe(RoundUpdate(1, 5, {"round": 1, "federated": None}))
    assert metrics.snapshot()["run"]["round"] == 1


def test_replay_after_resume_equals_live_observation() -> None:
    entries = [_entry(1), _entry(2)]
    live, replayed = RunMetrics(), RunMetrics()
    for e in entries:
        live.observe(RoundUpdate(e["round"], 4, e))
    replayed.replay(entries, 4)

    def comparable(m: RunMetrics) -> dict:
        # creation timestamps differ; NaN != NaN, so compare it as a marker
        return {
            k: ("nan" if math.isnan(v) else v)
            for k, v in _samples(m).items()
            if not k[0].endswith("_created")
        }

    assert comparable(replayed) == comparable(live)
    assert _value(_samples(replayed), "medfed_round") == 2


def test_each_run_has_its_own_registry() -> None:
    a, b = RunMetrics(), RunMetrics()
    a.observe(RoundUpdate(3, 5, _entry(3)))
    assert _value(_samples(b), "medfed_round") == 0
