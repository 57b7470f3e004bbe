"""Masks placed on their images by geometry, not by shape (issue 17 item 7).

Where both headers carry a patient frame the mask is resampled onto the image's grid; where
one does not, ITK's 2D convention decides. The reference for "lines up" is ITK itself: a mask
SimpleITK writes from the DICOM series it read.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from common.data import ImageError, Preprocess
from common.data.alignment import ITK_CONVENTION, RESAMPLED, SAME_GRID
from common.data.image import decode_mask, read_raw
from tests.common.conftest import write_dicom, write_nifti
from tests.common.mask_files import chest_radiograph, write_radiograph

ROWS, COLS = 24, 30


def full_size(mask, image):
    """decode_mask at the image's own size: (mask (S, R, C), placement)."""
    meta = read_raw(image).meta
    side = max(meta.rows, meta.cols)
    out, _, placement = decode_mask(mask, Preprocess(image_size=side), like=meta, image=image)
    top, left = (side - meta.rows) // 2, (side - meta.cols) // 2
    return out[:, 0, top:top + meta.rows, left:left + meta.cols], placement


def labels_of(value: np.ndarray) -> np.ndarray:
    """The label a voxel gets from its own stored value (file * 1000 + row * COLS + column)."""
    file, rest = value // 1000, value % 1000
    row, col = rest // COLS, rest % COLS
    one = np.isin(file, (1, 2)) & (row >= 3) & (row <= 9) & (col >= 12) & (col <= 25)
    two = (file == 3) & (row >= 15) & (col <= 6)
    return np.where(two, 2, np.where(one, 1, 0)).astype(np.uint8)


def sagittal_series(folder):
    """Four sagittal slices, written out of order; each pixel stores its own identity."""
    ids = np.arange(ROWS * COLS).reshape(ROWS, COLS)
    for file, x in [(2, 3.0), (0, 0.0), (3, 4.5), (1, 1.5)]:
        write_dicom(
            folder / f"f{file}.dcm", (file * 1000 + ids).astype(np.uint16),
            ImageOrientationPatient=[0, 1, 0, 0, 0, -1],  # columns go posterior, rows down
            ImagePositionPatient=[x, -10.0, 40.0], PixelSpacing=[0.8, 0.9],
            SliceThickness=1.5, InstanceNumber=file + 1,
            FrameOfReferenceUID="1.2.826.0.1.3680043.8.498.5",
        )
    return folder


def test_a_mask_simpleitk_writes_from_a_dicom_series_lines_up_with_it(tmp_path):
    series = sagittal_series(tmp_path / "series")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    volume = reader.Execute()
    # The mask is drawn in ITK's own index space, from ITK's own pixels.
    mask = sitk.GetImageFromArray(labels_of(sitk.GetArrayFromImage(volume).astype(np.int64)))
    mask.CopyInformation(volume)
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    # NIfTI is laid out by its affine (axial planes), the series by its slices (sagittal):
    # the shapes differ and only the geometry can put one on the other.
    assert nib.load(tmp_path / "mask.nii.gz").shape != (4, ROWS, COLS)
    placed, placement = full_size(tmp_path / "mask.nii.gz", series)
    values = read_raw(series).pixels[..., 0].astype(np.int64)
    assert placement == RESAMPLED
    np.testing.assert_array_equal(placed, labels_of(values))
    assert set(np.unique(placed)) == {0, 1, 2}


def volume(shape=(20, 12, 3), seed=0):
    return np.random.default_rng(seed).normal(100, 10, shape).astype(np.float32)


def lesion(shape=(20, 12, 3)):
    labels = np.zeros(shape, np.uint8)
    labels[2:6, 1:4, :] = 1
    labels[12:15, 7:11, 1] = 2
    return labels


def as_on_image(mask, image):
    """What `mask` written with the image's own affine decodes to."""
    write_nifti(image.parent / "reference.nii.gz", lesion(), np.eye(4))
    return full_size(image.parent / "reference.nii.gz", image)[0]


@pytest.mark.parametrize("how", ["transposed", "flipped and shifted", "twice as fine"])
def test_a_nifti_mask_in_another_orientation_with_a_correct_affine_is_resampled(tmp_path, how):
    image = write_nifti(tmp_path / "img.nii.gz", volume())
    labels = lesion()
    if how == "transposed":  # axes x and y swapped, and the affine says so
        data, affine = labels.transpose(1, 0, 2), np.eye(4)[[1, 0, 2, 3]].T
    elif how == "flipped and shifted":  # x and y run the other way from the far corner
        data, affine = labels[::-1, ::-1], np.diag([-1.0, -1.0, 1.0, 1.0])
        affine[:2, 3] = [19, 11]
    else:  # 0.5 mm voxels: each image voxel is 2 x 2 x 2 mask voxels
        data = labels.repeat(2, 0).repeat(2, 1).repeat(2, 2)
        affine = np.diag([0.5, 0.5, 0.5, 1.0])
        affine[:3, 3] = -0.25  # voxel centres of the fine grid straddle the coarse ones
    write_nifti(tmp_path / "mask.nii.gz", np.ascontiguousarray(data), affine)
    placed, placement = full_size(tmp_path / "mask.nii.gz", image)
    # Reading a NIfTI file by its affine already undoes a flip or a transposition.
    assert placement == (RESAMPLED if how == "twice as fine" else SAME_GRID)
    np.testing.assert_array_equal(placed, as_on_image(labels, image))


def test_a_mask_on_the_same_grid_is_kept_as_it_is(tmp_path):
    image = write_nifti(tmp_path / "img.nii.gz", volume())
    write_nifti(tmp_path / "mask.nii.gz", lesion())
    assert full_size(tmp_path / "mask.nii.gz", image)[1] == SAME_GRID


@pytest.mark.parametrize(
    ("offset", "message"),
    [((0, 0, 50.0), r"mask mask.nii.gz and image img.nii.gz do not overlap in the patient "
                    r"\(first pixel: mask at .* mm, image at .* mm \(LPS\)\)"),
     ((0, 6.0, 0), r"only 0% of mask mask.nii.gz and image img.nii.gz's foreground lies inside"),
     ((3.0, 0, 0), r"overlap on 85% of the image only .* trained on as background")],
)
def test_a_mask_elsewhere_in_the_patient_is_refused_naming_both_files(tmp_path, offset, message):
    image = write_nifti(tmp_path / "img.nii.gz", volume())
    affine = np.eye(4)
    affine[:3, 3] = offset
    labels = lesion()
    if offset[1]:  # foreground at y 8..11 only, which the shift moves past the image's y 11
        labels = np.zeros_like(labels)
        labels[5:9, 8:12] = 1
    write_nifti(tmp_path / "mask.nii.gz", labels, affine)
    with pytest.raises(ImageError, match=message) as refused:
        full_size(tmp_path / "mask.nii.gz", image)
    assert "export the mask from this image" in refused.value.reason


def test_a_radiograph_mask_is_read_by_itk_2d_convention_and_its_affine(tmp_path):
    pixels, lungs = chest_radiograph(seed=5)
    image = write_radiograph(tmp_path / "img.dcm", pixels)
    # ITK's layout (Columns, Rows), but stored with the columns reversed and an affine that
    # says so (its first axis runs toward the patient's right): the same mask.
    data = lungs.T[::-1]
    affine = np.diag([2.6, -2.6, 1.0, 1.0])
    write_nifti(tmp_path / "flipped.nii.gz", np.ascontiguousarray(data), affine)
    placed, placement = full_size(tmp_path / "flipped.nii.gz", image)
    assert placement == ITK_CONVENTION
    np.testing.assert_array_equal(placed[0], lungs)
    # The same voxels with ITK's default affine say "mirrored": the content check sees it.
    write_nifti(tmp_path / "mirrored.nii.gz", np.ascontiguousarray(data),
                np.diag([-2.6, -2.6, 1.0, 1.0]))
    with pytest.raises(ImageError, match="appears flipped left-right against"):
        full_size(tmp_path / "mirrored.nii.gz", image)


def test_a_radiograph_mask_with_other_pixel_spacing_is_refused(tmp_path):
    pixels, lungs = chest_radiograph(seed=6)
    image = write_radiograph(tmp_path / "img.dcm", pixels)
    write_nifti(tmp_path / "mask.nii.gz", np.ascontiguousarray(lungs.T),
                np.diag([-1.3, -1.3, 1.0, 1.0]))
    with pytest.raises(ImageError, match=r"pixel spacing: mask 1.3x1.3 mm, image 2.6x2.6 mm"):
        full_size(tmp_path / "mask.nii.gz", image)


def test_a_flipped_mask_simpleitk_writes_for_a_series_is_refused(tmp_path):
    pixels, lungs = chest_radiograph(seed=2)  # one whose flip shows (test_mask_content)
    folder = tmp_path / "series"
    for i, z in enumerate([0.0, 2.6, 5.2]):
        write_dicom(folder / f"{i}.dcm", pixels, ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                    ImagePositionPatient=[-200.0, -150.0, z], PixelSpacing=[2.6, 2.6],
                    InstanceNumber=i + 1, FrameOfReferenceUID="1.2.826.0.1.3680043.8.498.6")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    volume = reader.Execute()
    for name, labels in (("right", lungs), ("flipped", lungs[::-1])):
        mask = sitk.GetImageFromArray(np.ascontiguousarray(np.stack([labels] * 3)))
        mask.CopyInformation(volume)
        sitk.WriteImage(mask, str(tmp_path / f"{name}.nii.gz"))
    placed, _ = full_size(tmp_path / "right.nii.gz", folder)
    np.testing.assert_array_equal(placed, np.stack([lungs] * 3))
    with pytest.raises(ImageError, match=r"flipped.nii.gz appears flipped up-down against "
                       r".*series: its outline follows"):
        full_size(tmp_path / "flipped.nii.gz", folder)
