"""The membership-inference audit tells a memorising model from one that never saw the data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.data import Preprocess, SiteData
from common.training.loop import LocalTraining, train_local
from models import build_model
from server.record import RunRecord
from simulations.privacy_audit import AUDIT_FILE, audit_privacy
from tests.simulations.conftest import write_easy_site


@pytest.fixture(scope="module")
def noise_site(tmp_path_factory) -> Path:
    """Labels independent of the images: only memorising can fit the training split."""
    root = tmp_path_factory.mktemp("noise") / "sites" / "site-a"
    write_easy_site(root, 60, 0.5, np.random.default_rng(4))
    rows = (root / "labels.csv").read_text().splitlines()
    flips = np.random.default_rng(5).integers(0, 2, len(rows) - 1)
    body = [
        f"{r.split(',')[0]},{f},{r.split(',')[2]}" for r, f in zip(rows[1:], flips, strict=True)
    ]
    (root / "labels.csv").write_text("\n".join([rows[0], *body]) + "\n")
    return root.parent


def _run(tmp_path: Path, sites: Path, epochs: int) -> Path:
    tmp_path.mkdir(parents=True)
    cfg = RunConfig(sites_dir=str(sites), out=str(tmp_path), image_size=32, dp=False)
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=32)
    if epochs:
        train = SiteData(sites / "site-a", Preprocess(image_size=32), seed=0).split("train")
        train_local(model, train.images, train.labels, device=torch.device("cpu"),
                    settings=LocalTraining(epochs=epochs, batch_size=8, lr=3e-3))
    RunRecord(tmp_path, cfg).save_model(
        {k: v.detach().numpy() for k, v in model.state_dict().items()}
    )
    return tmp_path


def test_a_memorising_model_is_caught_and_an_untrained_one_is_not(noise_site: Path,
                                                                  tmp_path: Path) -> None:
    memorised = audit_privacy(_run(tmp_path / "memorised", noise_site, epochs=60), noise_site)
    untrained = audit_privacy(_run(tmp_path / "untrained", noise_site, epochs=0), noise_site)
    assert memorised["attack_auc"] > 0.75, memorised
    assert abs(untrained["attack_auc"] - 0.5) < 0.2, untrained
    site = memorised["sites"]["site-a"]
    assert site["members"] == site["non_members"] > 0
    assert site["member_loss"] < site["non_member_loss"]
    written = json.loads((tmp_path / "memorised" / AUDIT_FILE).read_text())
    assert written["attack_auc"] == memorised["attack_auc"]


def test_a_run_folder_without_a_model_is_named(tmp_path: Path, noise_site: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model.pt"):
        audit_privacy(tmp_path, noise_site)
