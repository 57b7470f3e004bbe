"""Partitioners: every sample goes to one site, skew follows alpha, the seed decides."""

from pathlib import Path

import numpy as np
import pytest

from common.data import Preprocess
from simulations.partition import (
    PartitionSpec,
    VirtualSites,
    label_skew,
    partition,
    pooled,
    site_index,
    site_name,
)
from tests.simulations.conftest import write_easy_site

LABELS = np.random.default_rng(0).integers(0, 2, 2000)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity"])
@pytest.mark.parametrize("num_sites", [1, 7, 50, 2000])
def test_every_sample_goes_to_exactly_one_site(method: str, num_sites: int):
    parts = partition(LABELS, PartitionSpec(num_sites, method, alpha=0.3, seed=4))
    assert len(parts) == num_sites
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(LABELS)))  # sizes sum, nothing twice
    assert min(len(p) for p in parts) >= 1  # the pool has enough samples: no empty site


def test_more_sites_than_samples_leaves_some_empty_but_loses_nothing():
    parts = partition(LABELS[:10], PartitionSpec(30, "dirichlet", alpha=0.5))
    assert sum(len(p) for p in parts) == 10


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity"])
def test_same_seed_same_partition_other_seed_other_partition(method: str):
    a = partition(LABELS, PartitionSpec(20, method, alpha=0.5, seed=1))
    b = partition(LABELS, PartitionSpec(20, method, alpha=0.5, seed=1))
    c = partition(LABELS, PartitionSpec(20, method, alpha=0.5, seed=2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_label_skew_grows_as_alpha_shrinks():
    skews = [
        np.mean([
            label_skew(LABELS, partition(LABELS, PartitionSpec(40, "dirichlet", alpha, seed)))
            for seed in range(3)
        ])
        for alpha in (0.05, 0.5, 5.0, 500.0)
    ]
    assert skews == sorted(skews, reverse=True), skews
    iid = label_skew(LABELS, partition(LABELS, PartitionSpec(40, "iid")))
    assert skews[0] > 0.35  # nearly one class per site
    assert skews[-1] < 2 * iid + 0.02  # large alpha comes close to IID


def test_quantity_skew_varies_sizes_not_labels():
    sizes = {
        alpha: np.array([len(p) for p in partition(LABELS, PartitionSpec(40, "quantity", alpha))])
        for alpha in (0.3, 100.0)
    }
    iid_sizes = [len(p) for p in partition(LABELS, PartitionSpec(40, "iid"))]
    assert max(iid_sizes) - min(iid_sizes) <= 1
    assert sizes[0.3].std() > 3 * sizes[100.0].std()
    parts = partition(LABELS, PartitionSpec(10, "quantity", alpha=0.3))
    assert label_skew(LABELS, parts) < 0.2  # labels stay (roughly) IID


def test_bad_specs_name_the_key():
    with pytest.raises(ValueError, match="data.partition"):
        PartitionSpec(3, "random")
    with pytest.raises(ValueError, match="data.alpha"):
        PartitionSpec(3, "dirichlet", alpha=0)


def test_site_names_round_trip():
    assert site_name(0) == "site-0001" and site_name(999) == "site-1000"
    assert [site_index(site_name(i)) for i in (0, 41, 999)] == [0, 41, 999]
    with pytest.raises(ValueError):
        site_index("hospital-01")


def test_virtual_sites_share_one_decoded_pool(tmp_path: Path):
    pool = tmp_path / "pool"
    write_easy_site(pool, 60, 0.5, np.random.default_rng(0))
    sites = VirtualSites(pool, tmp_path / "state", PartitionSpec(9, "dirichlet", 0.5, seed=3))
    pre = Preprocess(image_size=16, channels=1)
    assert len(sites) == 9 and sites[8].name == "site-0009" and sites[-1].name == "site-0009"
    assert [s.name for s in sites[:2]] == ["site-0001", "site-0002"]
    assert sites[0].state_dir == tmp_path / "state" / "site-0001"
    with pytest.raises(IndexError):
        sites[9]
    pooled.cache_clear()
    total = {"train": 0, "val": 0}
    for site in sites:
        for split in total:
            images, labels = sites.labelled(site, pre, 0, split)
            assert images.shape[1:] == (1, 16, 16) and len(images) == len(labels)
            total[split] += len(labels)
    # one decode for all sites and splits
    assert pooled.cache_info().misses == 1
    whole = pooled(pool, pre, 0, sites.spec)
    assert total == {split: len(whole[split].labels) for split in total}
    # the pool's test split is the central test set: a virtual site holds none of it (the
    # cross-site evaluation then scores its validation split)
    images, labels = sites.labelled(sites[0], pre, 0, "test")
    assert images.shape == (0, 1, 16, 16) and labels.shape == (0,)
    with pytest.raises(ValueError, match="train and val"):
        sites.labelled(sites[0], pre, 0, "all")
