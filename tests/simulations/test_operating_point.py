"""End to end: the threshold chosen on the sites' histograms is the one reported and saved."""

import json
from pathlib import Path

import pytest
import torch

from common.config import RunConfig
from simulations.runner import simulate
from tests.simulations.conftest import write_easy_hospitals

pytestmark = pytest.mark.slow

FINAL_KEYS = ("auc", "sensitivity", "specificity", "balanced_accuracy", "accuracy", "threshold",
              "ece", "brier")


def test_a_run_reports_and_saves_its_operating_point(tmp_path: Path) -> None:
    root = write_easy_hospitals(tmp_path / "data", [("site-a", 40, 0.3), ("site-b", 40, 0.7)],
                                30, seed=3)
    run_dir = tmp_path / "run"
    cfg = RunConfig(sites_dir=str(root / "sites"), test_data=str(root / "test"),
                    out=str(run_dir), rounds=2, dp=False, image_size=32, local_steps=5,
                    batch_size=8, seed=0)
    results = simulate(cfg)
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["final"] == json.loads(json.dumps(results["final"]))
    final = on_disk["final"]
    for key in FINAL_KEYS:
        assert key in final, key
    assert isinstance(on_disk["warnings"], list)

    last = on_disk["rounds"][-1]
    point = last["operating_point"]
    # the central test set is scored at the threshold the sites' validation histograms chose
    assert last["central"]["threshold"] == point["threshold"] == final["threshold"]
    assert 0 < point["threshold"] < 1 and point["rule"] == "youden"
    # per-site fairness: each site's own rates at that threshold, the worst and the mean
    assert set(final["per_site"]) == {"site-a", "site-b"}
    for key in ("auc", "sensitivity", "specificity", "balanced_accuracy"):
        values = [site[key] for site in final["per_site"].values() if site[key] is not None]
        assert final["fairness"]["worst"][key] == min(values)
    # the sites' counts add up to their validation images, none of them leaves as a score
    assert point["positives"] + point["negatives"] == last["federated"]["evaluate"]["num-examples"]
    assert "score-hist-0" not in json.dumps(on_disk)

    saved = torch.load(run_dir / "model.pt", weights_only=True)
    assert saved["threshold"] == final["threshold"]
