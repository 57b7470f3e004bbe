"""check_site's checks of masks, duplicate images and class ids (issue 20, item 6)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from common.config import TASKS
from common.data import Preprocess, check_site
from tests.common.conftest import write_dicom

PRE = Preprocess(image_size=16)
SHAPE = (20, 12, 3)  # NIfTI x, y, z


def lesion(shape=SHAPE) -> np.ndarray:
    """A label map with an off-centre lesion, so that a rotated copy differs from it."""
    mask = np.zeros(shape, dtype=np.uint8)
    mask[2:6, 1:4, :] = 1
    return mask


def nifti_site(root, nifti_file, labels_csv, masks, extra_rows=()):
    """Training rows img{i}.nii.gz with mask m{i}.nii.gz = masks[i] ((data, affine) or None)."""
    rng = np.random.default_rng(0)
    lines = []
    for i, mask in enumerate(masks):
        nifti_file(root / f"img{i}.nii.gz", rng.normal(100, 10, SHAPE).astype(np.float32))
        cell = ""
        if mask is not None:
            data, affine = mask
            nifti_file(root / f"m{i}.nii.gz", data, affine)
            cell = f"m{i}.nii.gz"
        lines.append([f"img{i}.nii.gz", i % 2, cell, "train"])
    labels_csv(root, [*lines, *extra_rows], header="path,label,mask,split")
    return root


def card_of(site, tmp_path, **kwargs):
    return check_site(site, PRE, cache_dir=tmp_path / "cache", **kwargs)


def problem(card, path):
    return next((p.reason for p in card.problems if p.path == path), None)


def test_mask_with_other_dimensions_is_named_and_its_row_skipped(
    tmp_path, nifti_file, labels_csv
):
    site = nifti_site(tmp_path / "s", nifti_file, labels_csv, [
        (lesion(), None), (lesion((20, 12, 2)), None), (lesion(), None),
    ])
    card = card_of(site, tmp_path)
    reason = problem(card, "m1.nii.gz")
    assert reason is not None and "mask geometry does not match its image" in reason
    assert "row img1.nii.gz skipped" in reason
    assert card.usable and card.readable_rows == 2 and card.mask_rows["train"] == 2
    assert "m1.nii.gz: mask geometry does not match" in card.to_text()


def test_nifti_mask_rotated_180_degrees_through_its_affine_is_named(
    tmp_path, nifti_file, labels_csv
):
    x, y, _ = SHAPE
    # Same voxels, but the affine says x and y run the other way: in the patient the mask lies
    # rotated 180 degrees about the image's centre, and the reader would hand it back flipped.
    rotated = np.diag([-1.0, -1.0, 1.0, 1.0])
    # The same rotation applied to both the voxels and the affine is the same mask in space.
    consistent = rotated.copy()
    consistent[:2, 3] = [x - 1, y - 1]
    site = nifti_site(tmp_path / "s", nifti_file, labels_csv, [
        (lesion(), None), (lesion(), rotated), (lesion()[::-1, ::-1].copy(), consistent),
    ])
    card = card_of(site, tmp_path)
    reason = problem(card, "m1.nii.gz")
    assert reason is not None and "mask is not on its image's grid" in reason
    assert "orientation" in reason or "first pixel" in reason
    assert problem(card, "m2.nii.gz") is None
    assert problem(card, "m0.nii.gz") is None
    assert card.mask_rows["train"] == 2


def test_nifti_mask_shifted_in_space_is_named(tmp_path, nifti_file, labels_csv):
    shifted = np.eye(4)
    shifted[:3, 3] = [0, 0, 5.0]
    site = nifti_site(
        tmp_path / "s", nifti_file, labels_csv, [(lesion(), None), (lesion(), shifted)]
    )
    reason = problem(card_of(site, tmp_path), "m1.nii.gz")
    assert reason is not None and "first pixel: mask at (" in reason


def test_dicom_mask_rotated_180_degrees_through_its_orientation_is_resampled(
    tmp_path, dicom_file, labels_csv, mr
):
    site = tmp_path / "s"
    frame = {"ImagePositionPatient": [0, 0, 0], "PixelSpacing": [1, 1]}
    labels = np.zeros((32, 32), dtype=np.uint8)
    labels[3:9, 20:30] = 1
    lines = []
    for i in range(3):
        dicom_file(site / f"img{i}.dcm", mr(i), ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                   **frame)
        lines.append([f"img{i}.dcm", i % 2, f"m{i}.dcm", "train"])
    dicom_file(site / "m0.dcm", labels, modality="OT", ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
               **frame)
    # m1: the mask stored rotated 180 degrees, and its header says so (rows and columns run
    # the other way from the opposite corner): correct DICOM, resampled onto the image's grid
    # (issue 17 item 7).
    dicom_file(site / "m1.dcm", np.rot90(labels, 2).copy(), modality="OT",
               ImageOrientationPatient=[-1, 0, 0, 0, -1, 0], ImagePositionPatient=[31, 31, 0],
               PixelSpacing=[1, 1])
    # m2: the image's orientation, another pixel spacing
    dicom_file(site / "m2.dcm", labels, modality="OT", ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
               ImagePositionPatient=[0, 0, 0], PixelSpacing=[0.5, 0.5])
    labels_csv(site, lines, header="path,label,mask,split")
    card = card_of(site, tmp_path)
    assert problem(card, "m1.dcm") is None
    assert "pixel spacing: mask 0.5x0.5 mm, image 1x1 mm" in (problem(card, "m2.dcm") or "")
    assert problem(card, "m0.dcm") is None and card.mask_rows["train"] == 2


@pytest.mark.parametrize(
    ("value", "message"),
    [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
     (-1.0, "found -1..1"), (0.5, "non-integer values")],
)
def test_mask_values_that_are_not_labels_are_named(
    tmp_path, nifti_file, labels_csv, value, message
):
    bad = lesion().astype(np.float32)
    bad[0, 0, 0] = value
    site = nifti_site(tmp_path / "s", nifti_file, labels_csv, [(lesion(), None), (bad, None)])
    card = card_of(site, tmp_path)
    assert message in (problem(card, "m1.nii.gz") or "")
    assert card.readable_rows == 1


def test_a_site_whose_only_mask_is_nan_is_not_usable(tmp_path, nifti_file, labels_csv):
    bad = np.full(SHAPE, np.nan, dtype=np.float32)
    site = nifti_site(tmp_path / "s", nifti_file, labels_csv, [(bad, None)])
    card = card_of(site, tmp_path)
    assert not card.usable
    assert "NaN" in (problem(card, "m0.nii.gz") or "")


def test_classification_check_leaves_masks_alone(tmp_path, nifti_file, labels_csv):
    bad = np.full(SHAPE, np.nan, dtype=np.float32)
    site = nifti_site(tmp_path / "s", nifti_file, labels_csv, [(bad, None), (lesion(), None)])
    card = card_of(site, tmp_path, masks=False, task="classify")
    assert card.usable and card.problems == [] and card.readable_rows == 2


def test_mask_values_above_num_classes(tmp_path, nifti_file, labels_csv):
    three = lesion() * 3
    site = nifti_site(tmp_path / "s", nifti_file, labels_csv, [(lesion(), None), (three, None)])
    card = card_of(site, tmp_path, num_classes=2)
    assert card.usable and card.mask_values == [0, 1, 3]
    assert card.masks_out_of_range == [{"path": "m1.nii.gz", "row": "img1.nii.gz", "max": 3}]
    assert any("--num-classes 4" in w and "only segmentation" in w for w in card.warnings)
    segment = card_of(site, tmp_path, num_classes=2, task="segment")
    assert not segment.usable
    assert "1 mask(s) hold values outside 0..1" in segment.reasons[0]


def test_segment_needs_a_usable_training_mask(tmp_path, nifti_file, labels_csv):
    site = nifti_site(tmp_path / "s", nifti_file, labels_csv, [None, None])
    assert card_of(site, tmp_path).usable
    card = card_of(site, tmp_path, task="segment")
    assert not card.usable and "no readable training image with a usable mask" in card.reasons[0]


def test_every_task_says_what_its_rows_need():
    from common.data.card import TASK_NEEDS

    assert set(TASK_NEEDS) == set(TASKS)


# --- duplicates across splits ------------------------------------------------------------


def dicom_rows(site, dicom_file, mr, count):
    for i in range(count):
        dicom_file(site / f"img{i}.dcm", mr(i))
    return [[f"img{i}.dcm", i % 2, ["train", "val", "test"][i % 3]] for i in range(count)]


def test_byte_identical_copy_in_train_and_test_is_a_loud_warning(
    tmp_path, dicom_file, labels_csv, mr
):
    site = tmp_path / "s"
    lines = dicom_rows(site, dicom_file, mr, 4)
    (site / "copy.dcm").write_bytes((site / "img0.dcm").read_bytes())  # img0 is in train
    labels_csv(site, [*lines, ["copy.dcm", 0, "test"]], header="path,label,split")
    card = card_of(site, tmp_path)
    assert card.usable and card.cross_split_duplicates == 1
    assert card.duplicates == [{
        "paths": ["img0.dcm", "copy.dcm"], "splits": ["train", "test"], "labels": [0, 0],
        "match": "byte-identical copies",
    }]
    assert any(w.startswith("LEAK: 1 image(s)") for w in card.warnings)
    text = card.to_text()
    assert "byte-identical copies: img0.dcm (train), copy.dcm (test)" in text
    assert json.loads(json.dumps(card.to_dict()))["cross_split_duplicates"] == 1


def test_symlinked_duplicate_is_found(tmp_path, dicom_file, labels_csv, mr):
    site = tmp_path / "s"
    lines = dicom_rows(site, dicom_file, mr, 4)
    (site / "linked").mkdir()
    os.symlink(site / "img0.dcm", site / "linked" / "scan.dcm")
    labels_csv(site, [*lines, ["linked/scan.dcm", 1, "val"]], header="path,label,split")
    card = card_of(site, tmp_path)
    assert card.cross_split_duplicates == 1
    assert card.duplicates[0]["match"] == "the same file (a symlink or a repeated path)"
    text = " ".join(card.to_text().split())
    assert "img0.dcm (train, label 0), linked/scan.dcm (val, label 1)" in text


def test_same_sop_instance_uid_with_other_bytes_is_found(tmp_path, dicom_file, labels_csv, mr):
    site = tmp_path / "s"
    lines = dicom_rows(site, dicom_file, mr, 4)
    # A re-export of img0 (other pixel bytes, same instance): a compressed copy, say.
    uid = str(__import__("pydicom").dcmread(site / "img0.dcm").SOPInstanceUID)
    dicom_file(site / "again.dcm", mr(99), SOPInstanceUID=uid)
    labels_csv(site, [*lines, ["again.dcm", 0, "test"]], header="path,label,split")
    card = card_of(site, tmp_path)
    assert card.cross_split_duplicates == 1
    assert card.duplicates[0]["match"] == "the same DICOM SOP Instance UID"


def test_duplicates_within_one_split_are_counted_but_are_no_leak(
    tmp_path, dicom_file, labels_csv, mr
):
    site = tmp_path / "s"
    lines = dicom_rows(site, dicom_file, mr, 4)
    (site / "copy.dcm").write_bytes((site / "img0.dcm").read_bytes())
    labels_csv(site, [*lines, ["copy.dcm", 0, "train"]], header="path,label,split")
    card = card_of(site, tmp_path)
    assert len(card.duplicates) == 1 and card.cross_split_duplicates == 0
    assert not any("LEAK" in w for w in card.warnings)
    assert any("more than once within a split" in w for w in card.warnings)


def test_distinct_images_are_no_duplicates(tmp_path, dicom_file, labels_csv, mr):
    site = tmp_path / "s"
    labels_csv(site, dicom_rows(site, dicom_file, mr, 6), header="path,label,split")
    card = card_of(site, tmp_path)
    assert card.duplicates == [] and card.cross_split_duplicates == 0


# --- class ids ---------------------------------------------------------------------------


@pytest.mark.parametrize("big", [7, 10**12])
def test_labels_outside_num_classes_are_named_per_row(tmp_path, dicom_file, labels_csv, mr, big):
    site = tmp_path / "s"
    lines = dicom_rows(site, dicom_file, mr, 4)
    dicom_file(site / "odd.dcm", mr(50))
    labels_csv(site, [*lines, ["odd.dcm", big, "train"]], header="path,label,split")
    card = card_of(site, tmp_path, num_classes=2)
    assert not card.usable
    assert card.labels_out_of_range == [{"path": "odd.dcm", "split": "train", "label": big}]
    assert card.reasons == [
        f"1 labels.csv row(s) have a label outside 0..1 (--num-classes 2), up to {big}: "
        "odd.dcm; fix those labels (class ids are 0..num-classes-1) or run with more classes"
    ]
    assert f"odd.dcm (train): label {big}" in card.to_text()
    # without --num-classes the gap in the class ids is still pointed out
    loose = card_of(site, tmp_path)
    assert loose.usable
    assert any(f"found 0, 1, {big}, so a model needs {big + 1} outputs" in w
               for w in loose.warnings)


def test_labels_within_num_classes_pass(tmp_path, dicom_file, labels_csv, mr):
    site = tmp_path / "s"
    labels_csv(site, dicom_rows(site, dicom_file, mr, 4), header="path,label,split")
    card = card_of(site, tmp_path, num_classes=2)
    assert card.usable and card.labels_out_of_range == []
    assert not any("class ids" in w for w in card.warnings)


def test_segmentation_training_skips_the_rotated_mask_too(tmp_path, nifti_file, labels_csv):
    from common.data import SiteData

    rotated = np.diag([-1.0, -1.0, 1.0, 1.0])
    site = nifti_site(
        tmp_path / "s", nifti_file, labels_csv, [(lesion(), None), (lesion(), rotated)]
    )
    data = SiteData(site, PRE, cache_dir=tmp_path / "cache", masks=True)
    assert [loaded.row_index for loaded in data.iter_rows("train")] == [0]
    assert data.problems[0].path == "m1.nii.gz"


def write_series(folder, pixels, z_positions, **attrs):
    for i, z in enumerate(z_positions):
        write_dicom(
            folder / f"{i}.dcm", pixels[i], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            ImagePositionPatient=[0, 0, z], PixelSpacing=[1, 1], InstanceNumber=i + 1,
            SeriesInstanceUID=attrs.get("series", "1.2.3.4"), modality=attrs.get("modality", "MR"),
        )


def test_dicom_series_mask_is_checked_slice_range_and_all(tmp_path, labels_csv, mr):
    site = tmp_path / "s"
    labels = np.zeros((3, 32, 32), dtype=np.uint8)
    labels[:, 4:9, 4:9] = 1
    write_series(site / "img0", np.stack([mr(i) for i in range(3)]), [0, 2, 4])
    write_series(site / "img1", np.stack([mr(i) for i in range(3)]), [0, 2, 4], series="1.2.3.5")
    # mask series in another file order but on the image's slices: the same grid
    write_series(site / "m0", labels, [4, 2, 0], series="1.2.3.6", modality="OT")
    # one slice (2 mm) higher: not on the image's slices
    write_series(site / "m1", labels, [2, 4, 6], series="1.2.3.7", modality="OT")
    labels_csv(site, [["img0", 0, "m0", "train"], ["img1", 1, "m1", "train"]],
               header="path,label,mask,split")
    card = card_of(site, tmp_path)
    assert problem(card, "m0") is None
    assert "first pixel: mask at (0.0, 0.0, 2.0) mm, image at (0.0, 0.0, 0.0) mm" in (
        problem(card, "m1") or ""
    )


def test_an_itk_slice_mask_on_a_sagittal_dicom_slice_is_accepted(
    tmp_path, dicom_file, nifti_file, labels_csv, mr
):
    """ITK writes a one-slice mask with the identity frame whatever the slice's orientation.

    Real masks drawn on sagittal MR slices come this way (shared/data's hippocampus sites): such
    a frame is no evidence of misalignment, while a one-slice mask whose affine says it is
    rotated still is.
    """
    site = tmp_path / "s"
    sagittal = {"ImageOrientationPatient": [0, 1, 0, 0, 0, -1],
                "ImagePositionPatient": [10, -20, 30], "PixelSpacing": [1, 1]}
    labels = np.zeros((32, 32), dtype=np.uint8)
    labels[3:9, 20:30] = 1
    lines = []
    for i in range(2):
        dicom_file(site / f"img{i}.dcm", mr(i), **sagittal)
        lines.append([f"img{i}.dcm", i % 2, f"m{i}.nii.gz", "train"])
    # as ITK writes a 2D slice: shape (columns, rows), RAS affine diag(-1, -1, 1)
    nifti_file(site / "m0.nii.gz", labels.T.copy(), np.diag([-1.0, -1.0, 1.0, 1.0]))
    nifti_file(site / "m1.nii.gz", labels.T.copy(), np.diag([1.0, 1.0, 1.0, 1.0]))
    labels_csv(site, lines, header="path,label,mask,split")
    card = card_of(site, tmp_path)
    assert problem(card, "m0.nii.gz") is None
    assert "orientation" in (problem(card, "m1.nii.gz") or "")
    assert card.mask_rows["train"] == 1
