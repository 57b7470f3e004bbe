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
    # every task's final model is scored at every site at the run's end (server.cross_site)
    cross = results["cross_site"]
    assert sorted(cross["sites"]) == ["hospital-01", "hospital-02"] and cross["failed"] == {}
    assert all(v["num-examples"] > 0 and "loss" in v for v in cross["sites"].values())
    card = json.loads((tmp_path / task / "model_card.json").read_text())
    assert card["performance"]["cross_site"]["sites"] == cross["sites"]
    if task == "segment":
        _check_fingerprint(results, tmp_path / task)
    if task == "autoencode":
        results = _run(hospitals, tmp_path / "pretrained", task="classify",
                       init_encoder=str(tmp_path / task))
        assert json.loads((tmp_path / "pretrained" / "results.json").read_text())["final"]["auc"]


def _check_fingerprint(results: dict, run_dir: Path) -> None:
    # the run was planned from every site's fingerprint, and only its aggregates left a site
    from common.fingerprint import LIST_KEYS, SCALAR_KEYS

    plan = results["plan"]
    assert sorted(plan["fingerprints"]) == ["hospital-01", "hospital-02"]
    assert plan["choices"]["net-width"] == 8 and plan["choices"]["net-depth"] == 2  # 16 px
    assert len(plan["choices"]["class-prior"]) == 2
    for site in ("hospital-01", "hospital-02"):
        trail = run_dir / "site-state" / site / "audit.jsonl"
        entries = [json.loads(line) for line in trail.read_text().splitlines()]
        queries = [e for e in entries if e["message_type"] == "query.fingerprint"]
        assert len(queries) == 1 and queries[0]["arrays"] == []
        assert set(queries[0]["metrics"]) == set(SCALAR_KEYS) | set(LIST_KEYS)
        assert queries[0]["configs"]["site"] == {"name": site}
        # DP: the class shares are the validation split's noisy release, accounted
        assert plan["fingerprints"][site]["shares-noise"] > 0
        assert results["privacy"][site]["validation_epsilon"] > 0
