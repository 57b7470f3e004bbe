"""`--dims 3`: a site's volume rows as (C, D, H, W) cubes, and the settings that choose it."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.config import ConfigError, RunConfig
from common.data import SiteData
from common.data.preprocess import Preprocess
from common.seg_plan import planned_patch
from common.sites import SiteRef
from common.training.tasks import get_task
from common.volumes import VolumeError, fullest_slices, resample_depth, volume_samples
from server.tasks.segment import masked_held_out

SIZE = 16


def _write_site(folder: Path, shapes, *, split="train", label_at=None) -> Path:
    """NIfTI volumes (x, y, z) whose intensity is high exactly where the mask is labelled.

    Each volume's structure is a box of label 1 in the lower half of its slices and a box of
    label 2 in the upper half, so a resampled mask is checked against its image slice by slice.
    """
    (folder / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["path,label,mask,split"]
    for i, shape in enumerate(shapes):
        mask = np.zeros(shape, np.uint8)
        x, y, z = shape
        if z > 1:
            mask[x // 4 : 3 * x // 4, y // 4 : 3 * y // 4, : z // 2] = 1
            mask[x // 4 : 3 * x // 4, y // 4 : 3 * y // 4, z // 2 :] = 2
        if label_at is not None and i == 0:
            mask[label_at] = 7
        image = (100 + 800 * (mask > 0) + rng.normal(0, 5, shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / "img" / f"v{i}.nii.gz")
        nib.save(nib.Nifti1Image(mask, np.eye(4)), folder / "img" / f"m{i}.nii.gz")
        lines.append(f"img/v{i}.nii.gz,1,img/m{i}.nii.gz,{split}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


def _cfg(**kw) -> RunConfig:
    return RunConfig(task="segment", dims=3, image_size=SIZE, num_classes=3, dp=False, **kw)


def _data(folder: Path) -> SiteData:
    return SiteData(folder, Preprocess(image_size=SIZE), masks=True)


def test_each_volume_row_is_one_cube_sample_with_its_mask_on_its_grid(tmp_path):
    site = _write_site(tmp_path / "site", [(12, 10, 7), (20, 20, 30)])
    images, masks = volume_samples([(_data(site), "train")], _cfg())
    assert images.shape == (2, 1, SIZE, SIZE, SIZE) and images.dtype == np.float32
    assert masks.shape == (2, SIZE, SIZE, SIZE) and masks.dtype == np.int64
    for image, mask, slices in zip(images, masks, (7, 30), strict=True):
        assert set(np.unique(mask)) == {0, 1, 2}
        inside, outside = image[0][mask > 0], image[0][mask == 0]
        # the structure's voxels are bright, the rest dark: mask and image line up in 3D
        assert inside.mean() > 0.8 and outside.mean() < 0.2
        # each resampled slice takes the label of the stored slice under its centre: label 1
        # below the stored volume's middle slice, 2 above
        for d in range(SIZE):
            stored = int((d + 0.5) * slices / SIZE)
            assert set(np.unique(mask[d])) - {0} == {1 if stored < slices // 2 else 2}


def test_resampling_the_slice_axis_keeps_labels_whole():
    labels = np.zeros((7, 1, 4, 4), np.float32)
    labels[3] = 5
    out = resample_depth(labels, 16, labels=True)
    assert out.shape == (1, 16, 4, 4)
    assert set(np.unique(out)) == {0, 5}  # nearest: no label blended into a new one
    smooth = resample_depth(np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1), 8)
    assert np.all(np.diff(smooth.ravel()) >= 0) and smooth.min() >= 0 and smooth.max() <= 3


def test_a_single_slice_row_is_refused_naming_the_file_and_dims_2(tmp_path):
    site = _write_site(tmp_path / "site", [(12, 10, 7), (12, 12, 1)])
    with pytest.raises(VolumeError, match=r"img/v1\.nii\.gz has 1 slice.*--dims 2"):
        volume_samples([(_data(site), "train")], _cfg())


def test_a_label_beyond_num_classes_names_the_flag(tmp_path):
    site = _write_site(tmp_path / "site", [(12, 10, 7)], label_at=(0, 0, 0))
    with pytest.raises(VolumeError, match=r"img/v0\.nii\.gz's mask holds label 7.*--num-classes 8"):
        volume_samples([(_data(site), "train")], _cfg())


def test_segment_task_loads_volumes_under_dims_3_and_slices_by_default(tmp_path):
    site = _write_site(tmp_path / "site", [(12, 10, 7), (20, 20, 30)])
    ref = SiteRef("site", site, tmp_path / "state")
    task = get_task("segment")
    images, masks = task.load(ref, _cfg(), "train", lambda *a: (None, None))
    assert images.shape == (2, 1, SIZE, SIZE, SIZE) and masks.shape == (2, SIZE, SIZE, SIZE)
    flat, flat_masks = task.load(
        ref, RunConfig(task="segment", image_size=SIZE, num_classes=3), "train",
        lambda *a: (None, None),
    )
    assert flat.shape == (7 + 30, 1, SIZE, SIZE) and flat_masks.shape == (37, SIZE, SIZE)


def test_the_aggregator_holds_out_volumes_under_dims_3(tmp_path):
    sites = tmp_path / "sites"
    _write_site(sites / "a", [(12, 10, 7)])
    test = _write_site(tmp_path / "test", [(12, 10, 9), (8, 8, 8)], split="test")
    cfg = _cfg(sites_dir=str(sites), test_data=str(test))
    images, masks = masked_held_out(cfg, [sites / "a"])
    assert images.shape == (2, 1, SIZE, SIZE, SIZE) and masks.shape == (2, SIZE, SIZE, SIZE)


def test_an_overlay_shows_each_volumes_slice_with_the_most_structure():
    images = np.zeros((2, 1, 4, 3, 3), np.float32)
    masks = np.zeros((2, 4, 3, 3), np.int64)
    masks[0, 2, :2, :2] = 1
    masks[0, 1, 0, 0] = 1
    images[0, 0, 2] = 0.5
    shown, truth, predicted = fullest_slices(images, masks, masks.copy())
    assert shown.shape == (2, 1, 3, 3) and truth.shape == predicted.shape == (2, 3, 3)
    assert truth[0].sum() == 4 and shown[0].max() == 0.5
    assert not truth[1].any()  # no structure: the middle slice


@pytest.mark.parametrize(
    ("settings", "flag"),
    [
        ({"dims": 3}, "--dims"),  # classify
        ({"task": "segment", "dims": 4}, "--dims"),
        ({"task": "segment", "patch_size": 32}, "--patch-size"),
        ({"task": "segment", "dims": 3, "image_size": 64, "patch_size": 96}, "--patch-size"),
        ({"task": "segment", "dims": 3, "image_size": 96, "patch_size": 36, "net_depth": 3},
         "--net-depth"),
        ({"task": "segment", "dims": 3, "image_size": 96, "patch_size": 45, "dp": False},
         "--patch-size"),
        ({"task": "segment", "dims": 3, "image_size": 49}, "--image-size"),
        ({"task": "segment", "dims": 3, "patch_size": -1}, "--patch-size"),
    ],
)
def test_volume_settings_that_cannot_work_name_their_flag(settings, flag):
    with pytest.raises(ConfigError, match=f"^{flag} "):
        RunConfig(**settings)


@pytest.mark.parametrize(
    ("image_size", "patch"), [(32, 32), (48, 48), (64, 64), (96, 48), (128, 64), (100, 48)]
)
def test_the_planned_patch_is_the_whole_volume_up_to_64_then_half(image_size, patch):
    assert planned_patch(image_size) == patch
    cfg = RunConfig(task="segment", dims=3, image_size=image_size, dp=False)
    assert cfg.patch() == patch
    args = cfg.network_args()
    assert args["dims"] == 3 and args["image_size"] == patch
    assert patch % 2 ** args["depth"] == 0


def test_slices_stay_the_default_and_a_2d_network_is_unchanged():
    cfg = RunConfig(task="segment", image_size=64)
    assert cfg.dims == 2 and cfg.patch() == 0
    assert cfg.network_args() == {
        "in_channels": 1, "num_classes": 2, "image_size": 64, "width": 8, "depth": 2, "dims": 2,
    }
    assert RunConfig.from_mapping({"task": "segment", "dims": "3", "patch-size": "16"}).dims == 3
