"""The bench's hard-scenario and real-data helpers: what they read from a run, and the skip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import hard
from bench import run as bench_run


def test_operating_point_takes_the_runs_balanced_accuracy_when_there() -> None:
    final = {"auc": 0.9, "sensitivity": 0.8, "specificity": 0.6, "balanced_accuracy": 0.75,
             "threshold": 0.31, "accuracy": 0.7}
    point = hard.operating_point(final)
    assert point["balanced_accuracy"] == 0.75 and point["threshold"] == 0.31
    assert point["auc"] == 0.9 and math.isnan(point["ece"])


def test_operating_point_works_balanced_accuracy_out_when_missing() -> None:
    point = hard.operating_point({"auc": 0.6, "sensitivity": 1.0, "specificity": 0.0})
    # a model that calls every image positive is at chance, whatever its accuracy
    assert point["balanced_accuracy"] == 0.5
    assert math.isnan(hard.operating_point({"auc": 0.6})["balanced_accuracy"])
    assert math.isnan(hard.operating_point({"sensitivity": None, "specificity": 0.5})[
        "balanced_accuracy"])


def test_steps_epsilon_and_central_epochs_from_a_run() -> None:
    results = {
        "rounds": [
            {"federated": {"sites": {"a": {"train": {"steps": 20}}, "b": {"train": {"steps": 20}},
                                     "c": {"evaluate": {}}}}},
            {"federated": {"sites": {"a": {"train": {"steps": 20}}}}},
        ],
        "privacy": {"a": {"dp": True, "epsilon": 7.5}, "b": {"dp": True, "epsilon": 8.0}},
    }
    assert hard.fl_steps(results) == 60
    assert hard.epsilon_max(results) == 8.0
    assert math.isnan(hard.epsilon_max({"privacy": {"a": {"dp": False, "epsilon": None}}}))
    # 60 steps at 10 batches an epoch (300 images, batch 32) is 6 epochs; never fewer than 1
    assert hard.central_epochs(60, 300, 32) == 6
    assert hard.central_epochs(3, 300, 32) == 1


def test_labelled_train_rows_counts_only_labelled_training_rows(tmp_path: Path) -> None:
    for name, text in {"a": "path,label,split\nx,1,train\ny,,train\nz,0,val\n",
                       "b": "path,label,split\nx,0,train\ny,1,train\n"}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "labels.csv").write_text(text)
    assert hard.labelled_train_rows(tmp_path) == 3


def test_breastmnist_is_skipped_with_a_note_without_the_shared_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(hard.DEV_DATA_ENV, str(tmp_path / "nowhere"))
    part = bench_run.breastmnist(bench_run.QUICK)
    assert set(part) == {"skipped"} and "no shared development data" in part["skipped"]
    assert bench_run.breastmnist_keys(part) == {}
    assert "Not measured: skipped" in bench_run.breastmnist_markdown(part)
    # the shared folder counts only when it holds the script that lays the data out
    (tmp_path / "data").mkdir()
    monkeypatch.setenv(hard.DEV_DATA_ENV, str(tmp_path / "data"))
    assert hard.dev_data(tmp_path) is None
    (tmp_path / "data" / "make_sites.py").write_text("")
    assert hard.dev_data(tmp_path) == tmp_path / "data"


def test_breastmnist_keys_and_section_show_each_run() -> None:
    run = {"layout": "hard", "dp": True, "strategy": "fedavg", "auc": 0.8, "sensitivity": 0.7,
           "specificity": 0.9, "balanced_accuracy": 0.8, "accuracy": 0.75, "epsilon_max": 7.9,
           "seconds": 120.0}
    part = {"rounds": 20, "test_images": 156,
            "runs": {"hard_dp": run, "default_nodp_scaffold": {
                "layout": "default", "dp": False, "strategy": "scaffold",
                "error": "medfed exited 1:\nboom"}}}
    keys = bench_run.breastmnist_keys(part)
    assert keys["breastmnist_hard_dp_auc"] == 0.8
    assert keys["breastmnist_hard_dp_epsilon_max"] == 7.9
    assert math.isnan(keys["breastmnist_default_nodp_scaffold_auc"])
    text = bench_run.breastmnist_markdown(part)
    assert ("| hard | epsilon 8 | fedavg | 0.800 | 0.700 | 0.900 | 0.800 | 0.750 | 7.900 | "
            "120 s |") in text
    assert "| default | off | scaffold | failed: boom |" in text and "AUC 0.901, ACC 0.863" in text


def test_results_json_and_benchmarks_md_carry_the_hard_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import time

    monkeypatch.setattr(bench_run, "RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(bench_run, "REPORT", tmp_path / "BENCHMARKS.md")
    monkeypatch.setattr(bench_run, "ROOT", tmp_path)
    # the machine's description imports torch, Flower and Opacus: not what is tested here
    monkeypatch.setattr(bench_run, "machine", lambda: {"cpu": "test", "cores": 2})
    hard_part = {"ratio": 0.95, "balanced_accuracy": 0.5, "central_auc": 0.9, "rounds": 20,
                 "fl": hard.operating_point({"auc": 0.855, "sensitivity": 1.0,
                                             "specificity": 0.0}),
                 "synth": hard.HARD_SYNTH, "fl_steps": 2000, "central_epochs": 54,
                 "central_steps": 2000, "train_images": 1183}
    bench_run.write_outputs(bench_run.QUICK, {"hard": hard_part, "breastmnist": {}}, {},
                            pending=[], started=time.perf_counter(), load_before=0.0)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["hard_fl_central_auc_ratio"] == 0.95
    assert results["hard_balanced_accuracy"] == 0.5
    assert results["passed"]["hard_fl_central_auc_ratio"] is False
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "(`hard_balanced_accuracy`) | 0.500 | >= 0.8 | FAIL" in text
    assert "--site-sizes 900,300,400,60,30" in text
    assert text.index("## Real data: BreastMNIST") < text.index("## Machine")
