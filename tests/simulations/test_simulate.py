"""End to end: synthetic hospitals -> Flower simulation -> results a researcher can trust."""

import json
from pathlib import Path

import pytest
import torch

from common.config import RunConfig
from common.privacy import epsilon_of
from models import build_model
from server.run import RoundUpdate
from simulations.runner import resume_config, simulate
from simulations.synth import synthesize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hospitals")
    synthesize(root, sites=3, images_per_site=40, seed=11, test_images=60)
    return root


def test_dp_federation_learns_accounts_privacy_and_resumes(easy_hospitals: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    cfg = RunConfig(
        sites_dir=str(easy_hospitals / "sites"), test_data=str(easy_hospitals / "test"),
        out=str(run_dir), rounds=3, local_epochs=2, batch_size=16, lr=3e-3, image_size=32,
        seed=0,
    )
    seen_rounds: list[int] = []

    def crash_after_round_two(update: RoundUpdate) -> None:
        seen_rounds.append(update.round)
        if update.round == 2:
            raise RuntimeError("the aggregator machine went down")

    with pytest.raises(RuntimeError):
        simulate(cfg, on_round=crash_after_round_two)
    assert seen_rounds == [1, 2]
    partial = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in partial["rounds"]] == [1, 2]

    # resume from the round-2 checkpoint and train the third round
    results = simulate(resume_config(run_dir, {}), resume=True)
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    sites = ["site-a", "site-b", "site-c"]
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
    text = (run_dir / "results.json").read_text() + json.dumps(state)
    assert "Test^Patient" not in text and "T0001" not in text


def test_synthetic_hospitals_federate_without_leaking_identifiers(
    hospitals: Path, tmp_path: Path
):
    """Synthetic DICOM hospitals through the whole pipeline; sites' held-out splits as test."""
    run_dir = tmp_path / "run"
    cfg = RunConfig(
        sites_dir=str(hospitals / "sites"), out=str(run_dir), rounds=1, local_steps=2, dp=False,
        strategy="fedmedian",
    )
    results = simulate(cfg)
    assert results["final"]["source"] == "central"
    assert results["rounds"][0]["participants"] == ["hospital-01", "hospital-02", "hospital-03"]
    assert results["privacy"]["hospital-01"] == {"dp": False, "epsilon": None}
    identifiers = json.loads((hospitals / "identifiers.json").read_text())
    written = [p for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".json", ".png")]
    text = "".join(p.read_text(errors="ignore") for p in written if p.suffix == ".json")
    values = [
        value
        for site in identifiers.values()
        for key in ("patient_names", "patient_ids")
        for value in site[key]
    ]
    assert values, "identifiers.json lists no identifiers"
    for value in values:
        assert str(value) not in text
