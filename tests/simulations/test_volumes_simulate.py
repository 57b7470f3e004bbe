"""A short `--dims 3` federation on NIfTI volumes: 3D U-Net, DP-SGD, sliding-window scores."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.config import RunConfig
from simulations.runner import simulate

pytestmark = pytest.mark.slow


def _site(folder: Path, n: int, split: str, seed: int) -> None:
    """`n` volumes of differing slice counts, each with a bright box labelled 1."""
    (folder / "img").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = ["path,label,mask,split"]
    for i in range(n):
        shape = (20, 20, int(rng.integers(12, 28)))
        mask = np.zeros(shape, np.uint8)
        x, y, z = rng.integers(2, 10, 3)
        mask[x : x + 8, y : y + 8, z : z + 6] = 1
        image = (200.0 + 600.0 * mask + rng.normal(0, 30, shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / "img" / f"v{i}.nii.gz")
        nib.save(nib.Nifti1Image(mask, np.eye(4)), folder / "img" / f"m{i}.nii.gz")
        row_split = split if split == "test" else ("val" if i % 4 == 3 else "train")
        lines.append(f"img/v{i}.nii.gz,1,img/m{i}.nii.gz,{row_split}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")


def test_a_volume_federation_trains_a_3d_unet_under_dp_and_scores_whole_volumes(tmp_path):
    for k in (1, 2):
        _site(tmp_path / "sites" / f"hospital-0{k}", 8, "train", seed=k)
    _site(tmp_path / "test", 4, "test", seed=9)
    cfg = RunConfig(
        task="segment", dims=3, image_size=16, patch_size=8, sites_dir=str(tmp_path / "sites"),
        test_data=str(tmp_path / "test"), out=str(tmp_path / "run"), rounds=1, local_steps=2,
        batch_size=4,
    )
    results = simulate(cfg)
    assert results["config"]["dims"] == 3 and results["plan"]["choices"]["patch-size"] == 8
    assert {"dice", "hd95", "nsd"} <= set(results["final"])
    assert results["final"]["source"] == "central"
    assert (tmp_path / "run" / "segmentation.png").stat().st_size > 1000
    for site in ("hospital-01", "hospital-02"):
        assert results["privacy"][site]["dp"] is True
        assert 0 < results["privacy"][site]["epsilon"] <= 8 + 1e-6
