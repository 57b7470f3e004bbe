"""NIfTI reading (canonical orientation, slicing) and masks on the image grid."""

from __future__ import annotations

import numpy as np
import pytest

from common.data import ImageError, Preprocess, load_image, load_mask
from common.data.image import read_raw


def volume() -> np.ndarray:
    return np.random.default_rng(0).normal(100, 20, (10, 20, 30)).astype(np.float32)


def test_nifti_10x20x30_becomes_30_slices_of_20x10(tmp_path, nifti_file):
    path = nifti_file(tmp_path / "v.nii.gz", volume(), np.diag([1.0, 2.0, 3.0, 1.0]))
    loaded = load_image(path, Preprocess(image_size=16))
    assert loaded.pixels.shape == (30, 1, 16, 16)
    assert 0.0 <= loaded.pixels.min() and loaded.pixels.max() <= 1.0
    meta = loaded.meta
    assert (meta.slices, meta.rows, meta.cols) == (30, 20, 10)
    assert meta.pixel_spacing == (2.0, 1.0)
    assert (meta.modality, meta.transfer_syntax, meta.photometric) == (None, "NIfTI", None)


@pytest.mark.parametrize("flip_x", [False, True], ids=["RAS", "LAS"])
def test_nifti_reoriented_to_canonical_then_laid_out_radiologically(tmp_path, nifti_file, flip_x):
    data = volume()
    affine = np.diag([-1.0 if flip_x else 1.0, 1.0, 1.0, 1.0])
    raw = read_raw(nifti_file(tmp_path / "v.nii", data, affine)).pixels[..., 0]
    canonical = data[::-1] if flip_x else data  # x flipped back to point right
    z, r, c = 7, 3, 2
    # rows run anterior -> posterior, columns patient right -> left
    assert raw[z, r, c] == pytest.approx(canonical[9 - c, 19 - r, z])


def test_nifti_2d_is_one_slice_and_4d_is_rejected(tmp_path, nifti_file):
    flat_path = nifti_file(tmp_path / "flat.nii", volume()[:, :, 0])
    flat = load_image(flat_path, Preprocess(image_size=8))
    assert flat.pixels.shape == (1, 1, 8, 8)
    trailing = nifti_file(tmp_path / "t.nii", volume()[..., None])
    assert load_image(trailing, Preprocess(image_size=8)).meta.slices == 30
    four_d = nifti_file(tmp_path / "4d.nii", np.zeros((4, 4, 4, 3), np.float32))
    with pytest.raises(ImageError, match=r"4D NIfTI \(shape 4x4x4x3\) is not supported"):
        load_image(four_d, Preprocess(image_size=8))


def test_truncated_nifti_is_an_image_error(tmp_path, nifti_file):
    path = nifti_file(tmp_path / "v.nii", volume())
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ImageError, match="unreadable NIfTI file"):
        load_image(path, Preprocess(image_size=8))


def test_nifti_mask_uses_nearest_neighbour_on_the_image_grid(tmp_path, nifti_file):
    image = load_image(nifti_file(tmp_path / "v.nii.gz", volume()), Preprocess(image_size=16))
    labels = np.zeros((10, 20, 30), np.uint8)
    labels[2:6, 4:15, :10] = 1
    labels[3:9, 5:15, 10:] = 2
    mask = load_mask(
        nifti_file(tmp_path / "m.nii.gz", labels), Preprocess(image_size=16), like=image
    )
    assert mask.shape == (30, 1, 16, 16) and mask.dtype == np.uint8
    assert set(np.unique(mask[:10])) == {0, 1}
    # Blending the 0/2 edges would invent a 1 there; nearest neighbour never does.
    assert set(np.unique(mask[10:])) == {0, 2}


def test_mask_with_other_geometry_is_rejected(tmp_path, nifti_file):
    image = load_image(nifti_file(tmp_path / "v.nii", volume()), Preprocess(image_size=16))
    wrong = nifti_file(tmp_path / "m.nii", np.zeros((10, 20, 29), np.uint8))
    with pytest.raises(ImageError, match=r"mask 29 slices of 20x10, image 30 slices of 20x10"):
        load_mask(wrong, Preprocess(image_size=16), like=image)


def test_dicom_mask_pads_like_its_image(tmp_path, dicom_file, mr):
    pre = Preprocess(image_size=32)
    image = load_image(dicom_file(tmp_path / "i.dcm", mr(0, (16, 32))), pre)
    labels = np.zeros((16, 32), np.uint16)
    labels[:, 20:] = 3
    mask = load_mask(dicom_file(tmp_path / "m.dcm", labels, modality="SEG"), pre, like=image)
    expected = np.zeros((32, 32), np.uint8)
    expected[8:24, 20:] = 3  # 8 rows of padding above and below, as for the image
    np.testing.assert_array_equal(mask[0, 0], expected)
    assert np.all(image.pixels[0, 0, :8] == 0)


def test_mask_with_non_label_values_is_rejected(tmp_path, nifti_file):
    image = load_image(nifti_file(tmp_path / "v.nii", volume()), Preprocess(image_size=8))
    with pytest.raises(ImageError, match="non-integer values"):
        load_mask(nifti_file(tmp_path / "m.nii", volume()), Preprocess(image_size=8), like=image)
    big = np.full((10, 20, 30), 300, np.int16)
    with pytest.raises(ImageError, match=r"integers 0..255, found 300..300"):
        load_mask(nifti_file(tmp_path / "b.nii", big), Preprocess(image_size=8), like=image)
