"""A site's data fingerprint: aggregates of its masks, noised and accounted under DP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client import validation
from client.fingerprint import CLASS_SHARES, measure, site_fingerprint
from common.config import RunConfig
from common.data import SiteData
from common.sites import SiteRef
from common.training.tasks.base import preprocess
from simulations.synth import synthesize


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fp")
    synthesize(root, sites=1, images_per_site=24, seed=5, test_images=10)
    return root / "sites" / "hospital-01"


def _data(folder: Path, cfg: RunConfig) -> SiteData:
    return SiteData(folder, preprocess(cfg), seed=cfg.seed, masks=True)


def test_measure_counts_the_masked_images_and_sums_their_class_fractions(site):
    cfg = RunConfig(task="segment", image_size=32, dp=False)
    data = _data(site, cfg)
    fp, train, val = measure(data)
    rows = {split: [r for r in data.iter_rows(split) if r.mask is not None]
            for split in ("train", "val")}
    assert fp.train_images == len(rows["train"]) and fp.val_images == len(rows["val"])
    expected = sum(np.bincount(r.mask.ravel(), minlength=2) / r.mask.size for r in rows["val"])
    assert val == pytest.approx(expected)
    assert sum(train) == pytest.approx(fp.train_images)  # each image adds fractions summing to 1
    assert fp.max_label == 1 and fp.class_shares == pytest.approx(tuple(train + val))
    stored = [r.image.meta for r in rows["train"] + rows["val"]]
    assert fp.rows == np.median([m.rows for m in stored])


def test_under_dp_only_the_noisy_validation_shares_leave_once_and_are_accounted(site, tmp_path):
    cfg = RunConfig(task="segment", image_size=32, dp=True, run_key="r1")
    ref = SiteRef("hospital-01", site, tmp_path / "state")
    data = _data(site, cfg)
    exact, _, val = measure(data)
    first = site_fingerprint(data, ref, cfg, "r1", budget=None, ledger_dir=tmp_path / "ledger")
    again = site_fingerprint(data, ref, cfg, "r1", budget=None, ledger_dir=tmp_path / "ledger")
    assert first == again  # one release per run: asking twice learns nothing new
    assert first.shares_noise == validation.released_noise(ref, "r1", CLASS_SHARES) >= 3.0
    assert not np.allclose(first.class_shares, val) and not np.allclose(
        first.class_shares, exact.class_shares)
    assert validation.spent(ref, "r1") is not None and validation.spent(ref, "r1") > 0
    no_dp = site_fingerprint(data, ref, cfg.replace(dp=False), "r2", budget=None,
                             ledger_dir=tmp_path / "ledger")
    assert no_dp == exact


def test_a_budget_too_small_for_the_release_leaves_the_shares_unknown(site, tmp_path):
    cfg = RunConfig(task="segment", image_size=32, dp=True, run_key="r3")
    ref = SiteRef("hospital-01", site, tmp_path / "state")
    fp = site_fingerprint(_data(site, cfg), ref, cfg, "r3", budget=1e-6,
                          ledger_dir=tmp_path / "ledger")
    assert all(np.isnan(fp.class_shares)) and np.isnan(fp.shares_noise)
    assert fp.train_images > 0  # the sizes still plan the run
