"""End to end: synthetic hospitals -> Flower simulation -> results a researcher can trust."""

import json
from pathlib import Path

import pytest
import torch

from common.config import RunConfig
from common.privacy import epsilon_of
from models import build_model
from simulations.runner import resume_config, simulate
from simulations.synth import synthesize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hospitals")
    synthesize(root, sites=3, images_per_site=160, seed=11, test_images=200)
    return root


def test_dp_federation_learns_accounts_privacy_and_resumes(hospitals: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    cfg = RunConfig(
        sites_dir=str(hospitals / "sites"), test_data=str(hospitals / "test"), out=str(run_dir),
        rounds=3, local_epochs=2, seed=0,
    )
    seen_rounds: list[int] = []
    partial = simulate(cfg.replace(rounds=2), on_round=lambda u: seen_rounds.append(u.round))
    assert seen_rounds == [1, 2]
    assert [r["round"] for r in partial["rounds"]] == [1, 2]

    # resume after round 2 and train the third round
    results = simulate(resume_config(run_dir, {"rounds": 3}), resume=True)
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    sites = ["hospital-01", "hospital-02", "hospital-03"]
    for entry in results["rounds"]:
        assert entry["participants"] == sites
        assert entry["failures"] == []
        assert set(entry["federated"]["sites"]) == set(sites)
        assert entry["duration_s"] > 0

    # the global model improves over its initial weights and clears a floor
    initial, final = results["initial"]["auc"], results["final"]["auc"]
    assert final > initial
    assert final >= 0.70, f"global AUC {final:.3f} below the floor"
    assert results["final"]["source"] == "central"

    # each site's epsilon is cumulative over both runs' rounds and matches Opacus's accountant
    config = results["config"]
    for site in sites:
        p = results["privacy"][site]
        assert p["dp"] is True
        assert p["epsilon"] <= config["target-epsilon"] + 1e-6
        recomputed = epsilon_of(
            [(p["noise_multiplier"], p["sample_rate"], p["steps"])], delta=p["delta"],
            accountant=p["accountant"],
        )
        assert p["epsilon"] == pytest.approx(recomputed, rel=1e-9)
        steps_per_round = round(1 / p["sample_rate"]) * config["local-epochs"]
        assert p["steps"] == 3 * steps_per_round

    # artefacts: a loadable model, a plot, a checkpoint
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    model = build_model(saved["model"], **saved["model_args"])
    model.load_state_dict(saved["state_dict"])
    assert (run_dir / "metrics.png").stat().st_size > 10_000
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["round"] == 3

    # nothing that identifies a patient reaches the aggregator's files
    identifiers = json.loads((hospitals / "identifiers.json").read_text())
    text = (run_dir / "results.json").read_text() + json.dumps(state)
    for value in [*identifiers["patient_names"], *identifiers["patient_ids"]]:
        assert str(value) not in text


def test_without_test_data_the_sites_held_out_splits_are_used(hospitals: Path, tmp_path: Path):
    cfg = RunConfig(
        sites_dir=str(hospitals / "sites"), out=str(tmp_path / "run"), rounds=1, dp=False,
        strategy="fedmedian",
    )
    results = simulate(cfg)
    assert results["final"]["source"] == "central"
    assert results["final"]["num-examples"] < 200  # the sites' test splits, not test/
    assert results["privacy"]["hospital-01"] == {"dp": False, "epsilon": None}
