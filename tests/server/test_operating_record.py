"""The aggregator's record of the operating point: results.json, model.pt, warnings everywhere."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from common.config import RunConfig
from common.metrics import classification_metrics
from common.operating import score_histograms
from medfed.console import print_results
from models import build_model
from server.federation import RoundLog
from server.metrics import RunMetrics
from server.operating import OperatingPoints, previous_threshold
from server.record import RunRecord
from server.run import RoundUpdate
from simulations.report import render_report

FINAL_KEYS = ("auc", "sensitivity", "specificity", "balanced_accuracy", "accuracy", "threshold",
              "ece", "brier")


def _histograms(seed: int, n: int, prevalence: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < prevalence).astype(int)
    scores = 1 / (1 + np.exp(-(rng.normal(0, 1.5, n) + 3 * (labels - 0.5))))
    return score_histograms(scores, labels)


def _record(tmp_path: Path, central: dict | None) -> tuple[RunRecord, OperatingPoints]:
    cfg = RunConfig(rounds=1, out=str(tmp_path), image_size=32, target_sensitivity=0.9)
    record = RunRecord(tmp_path, cfg)
    operating = OperatingPoints.for_run(cfg)
    log = RoundLog(round=1, train={"a": {"num-examples": 10.0}, "b": {"num-examples": 10.0}})
    log.histograms = {"a": _histograms(0, 80, 0.3), "b": _histograms(1, 120, 0.6)}
    log.evaluate_aggregated = {"auc": 0.8, "num-examples": 200.0}
    log.operating_point = operating.choose(1, log.histograms)
    record.add_round(log, central)
    return record, operating


def test_final_has_every_key_and_each_sites_rates_at_the_threshold(tmp_path: Path) -> None:
    record, operating = _record(tmp_path, None)  # no central test set: federated, labelled
    final = record.to_dict()["final"]
    for key in FINAL_KEYS:
        assert final[key] is not None, key
    assert final["source"] == "federated" and "validation" in final["data"]
    assert final["threshold"] == operating.threshold
    assert final["sensitivity"] >= 0.9  # --target-sensitivity 0.9 on the validation data
    assert set(final["per_site"]) == {"a", "b"}
    worst = final["fairness"]["worst"]["balanced_accuracy"]
    assert worst == min(s["balanced_accuracy"] for s in final["per_site"].values())


def test_the_threshold_goes_to_the_sites_and_survives_a_resume(tmp_path: Path) -> None:
    record, operating = _record(tmp_path, None)
    sent = operating.config(ConfigRecord({"rounds": 1}))
    assert sent["threshold"] == operating.threshold
    assert previous_threshold(record.rounds) == operating.threshold
    fresh = OperatingPoints.for_run(RunConfig(), None)
    assert dict(fresh.config(ConfigRecord({"rounds": 1}))) == {"rounds": 1}  # 0.5 until chosen
    assert fresh.current == 0.5
    other = OperatingPoints.for_run(RunConfig(num_classes=3), 0.7)
    assert other.current is None and other.choose(1, {"a": _histograms(0, 10, 0.5)}) is None


def test_model_file_carries_the_threshold(tmp_path: Path) -> None:
    record, operating = _record(tmp_path, None)
    record.threshold = operating.current
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=32)
    record.save_model({k: v.numpy() for k, v in model.state_dict().items()})
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["threshold"] == pytest.approx(operating.threshold)


def test_a_one_class_model_is_warned_about_everywhere(tmp_path: Path, capsys) -> None:
    labels = np.array([0] * 40 + [1] * 60)
    everyone_sick = np.tile([0.2, 0.8], (100, 1))
    central = {**classification_metrics(everyone_sick, labels, threshold=0.5), "threshold": 0.5}
    record, _ = _record(tmp_path, central)
    record.write_results()
    results = json.loads((tmp_path / "results.json").read_text())
    (warning,) = results["warnings"]
    assert "every image positive" in warning and "central test set" in warning
    assert results["rounds"][-1]["warnings"] == [warning]
    # the terminal: in yellow, and the run still exits 0 (a warning, not a failure)
    assert print_results(results, tmp_path) == 0
    assert "warning:" in capsys.readouterr().err
    # the report, before any section
    html = render_report(results)
    assert html.index("Warning: the model calls every image positive") < html.index("<section")
    # the dashboard's state
    metrics = RunMetrics()
    metrics.observe(RoundUpdate(1, 1, results["rounds"][-1]))
    assert metrics.snapshot()["history"][-1]["warnings"] == [warning]


def test_a_usable_model_has_no_warning(tmp_path: Path) -> None:
    labels = np.array([0] * 40 + [1] * 60)
    good = np.stack([1 - (labels * 0.8 + 0.1), labels * 0.8 + 0.1], axis=1)
    record, _ = _record(tmp_path, {**classification_metrics(good, labels), "threshold": 0.5})
    assert record.to_dict()["warnings"] == []
