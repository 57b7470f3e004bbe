"""One short federation per new task: each writes its outputs and headline metrics."""

import json
from pathlib import Path

import pytest

from common.config import RunConfig
from simulations.runner import simulate
from simulations.synth import synthesize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    synthesize(root, sites=2, images_per_site=24, seed=3, test_images=24)
    return root


def _run(hospitals: Path, out: Path, **kw) -> dict:
    cfg = RunConfig(sites_dir=str(hospitals / "sites"), test_data=str(hospitals / "test"),
                    out=str(out), rounds=1, local_steps=2, image_size=16, batch_size=8, **kw)
    return simulate(cfg)


@pytest.mark.parametrize(
    ("task", "headline", "output"),
    [("segment", "dice", "segmentation.png"),
     ("autoencode", "anomaly_auroc", "reconstructions.png"),
     ("synthesize", "tstr_auc", "samples/round-001.png")],
)
def test_task_federation_writes_outputs_metrics_and_privacy(hospitals, tmp_path, task, headline,
                                                            output):
    results = _run(hospitals, tmp_path / task, task=task)
    assert results["config"]["task"] == task
    assert headline in results["final"] and results["final"]["source"] == "central"
    assert (tmp_path / task / output).stat().st_size > 1000
    for site in ("hospital-01", "hospital-02"):
        assert results["privacy"][site]["dp"] is True
        assert 0 < results["privacy"][site]["epsilon"] <= 8 + 1e-6
    if task == "autoencode":
        results = _run(hospitals, tmp_path / "pretrained", task="classify",
                       init_encoder=str(tmp_path / task))
        assert json.loads((tmp_path / "pretrained" / "results.json").read_text())["final"]["auc"]
