"""`simulate` checks every site folder under --data before Ray starts (issue 20, finding 5)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from common.config import RunConfig
from common.data import DataError
from simulations.runner import simulate
from simulations.site_check import check_site_folders
from tests.simulations.conftest import write_easy_site


@pytest.fixture
def sites(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    for name in ("site-a", "site-b"):
        write_easy_site(tmp_path / "sites" / name, 12, 0.5, rng)
    return tmp_path / "sites"


def set_label(site: Path, line: int, label: object) -> None:
    """Rewrite the label of labels.csv line `line` (1 is the header)."""
    lines = (site / "labels.csv").read_text().splitlines()
    path, _, split = lines[line - 1].split(",")
    lines[line - 1] = f"{path},{label},{split}"
    (site / "labels.csv").write_text("\n".join(lines) + "\n")


def test_simulate_refuses_an_unusable_site_folder_before_ray_starts(
    sites: Path, tmp_path: Path
) -> None:
    set_label(sites / "site-b", 2, "cat")
    run_dir = tmp_path / "run"
    # short: Ray's socket paths under it must fit AF_UNIX's 107 bytes
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "MEDFED_CACHE_DIR": str(tmp_path / "c")}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "medfed", "simulate", "--data", str(sites), "--out",
         str(run_dir), "--rounds", "1", "--local-steps", "2", "--no-dp", "--metrics-port", "0"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    elapsed = time.monotonic() - started
    ray_started = (ray_tmp / "ray").exists()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, output
    assert f"site folder {sites / 'site-b'} is not usable for --task classify" in output
    assert "line 2: label 'cat' is not an integer" in output
    assert "or move it out of --data" in output and "site-a" not in output.split("error:")[1]
    # nothing started and nothing written: Ray makes RAY_TMPDIR/ray as it starts
    assert not ray_started
    assert not (run_dir / "results.json").exists() and not (run_dir / "site-state").exists()
    assert elapsed < 120


@pytest.mark.parametrize("label", [7, 10**12])
def test_a_label_beyond_the_runs_classes_is_refused_up_front(
    sites: Path, tmp_path: Path, label: int
) -> None:
    set_label(sites / "site-a", 3, label)
    cfg = RunConfig(sites_dir=str(sites), out=str(tmp_path / "run"), rounds=1, dp=False,
                    image_size=32)
    with pytest.raises(DataError) as refused:
        simulate(cfg)
    message = str(refused.value)
    assert f"site folder {sites / 'site-a'} is not usable" in message
    assert f"label outside 0..1 (--num-classes 2), up to {label}" in message
    assert "site-b" not in message.split("Fix each folder")[0]
    assert not (tmp_path / "run").exists()


def test_the_check_judges_for_the_task(sites: Path, tmp_path: Path) -> None:
    segment = RunConfig(sites_dir=str(sites), out=str(tmp_path / "r"), task="segment",
                        image_size=32)
    with pytest.raises(DataError, match="no readable training image with a usable mask"):
        check_site_folders(segment, sorted(sites.iterdir()))
    # autoencode needs no labels: a site of unlabelled images is fine
    for site in sites.iterdir():
        for line in range(2, 14):
            set_label(site, line, "")
    auto = RunConfig(sites_dir=str(sites), out=str(tmp_path / "r"), task="autoencode",
                     image_size=32)
    cards = check_site_folders(auto, sorted(sites.iterdir()))
    assert [c.usable for c in cards] == [True, True]
    with pytest.raises(DataError, match="no readable labelled training image"):
        check_site_folders(auto.replace(task="classify", model=""), sorted(sites.iterdir()))


def test_the_check_warms_the_cache_the_sites_read(sites: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MEDFED_CACHE_DIR", str(tmp_path / "cache"))
    cfg = RunConfig(sites_dir=str(sites), out=str(tmp_path / "r"), image_size=32)
    check_site_folders(cfg, sorted(sites.iterdir()))
    from client.site import load_labelled
    from common.sites import site_refs
    from common.training.tasks.base import preprocess

    entries = {p for p in (tmp_path / "cache").rglob("*.npz")}
    for ref in site_refs(sites, tmp_path / "state"):
        load_labelled(ref, preprocess(cfg), cfg.seed, "train")
    assert entries and {p for p in (tmp_path / "cache").rglob("*.npz")} == entries
