"""SiteData: splits as arrays, skipped files as Problems, and the disk cache."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from common.data import Preprocess, SiteData

PRE = Preprocess(image_size=16)
CORRUPT = {"trunc.dcm", "text.dcm", "mpeg.dcm", "missing.dcm"}


@pytest.fixture
def site(tmp_path, dicom_file, dicom_dataset, nifti_file, labels_csv, mr) -> Path:
    """A small site with good DICOM, a multi-frame, a series, a NIfTI and corrupt files."""
    root = tmp_path / "hospital_a"
    lines = []
    for i, split in enumerate(["train", "train", "train", "train", "val", "test"]):
        dicom_file(root / f"mr_{i}.dcm", mr(i))
        lines.append([f"mr_{i}.dcm", i % 2, split])
    dicom_file(root / "mf.dcm", np.stack([mr(10 + i) for i in range(3)]))
    nifti_file(root / "vol.nii.gz", np.random.default_rng(1).random((10, 20, 30), np.float32))
    for z in range(3):
        dicom_file(
            root / "series" / f"{z}.dcm",
            mr(20 + z),
            ImagePositionPatient=[0, 0, z],
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
        )
    (root / "series" / "notes.txt").write_text("not an image")
    trunc = dicom_file(root / "trunc.dcm", mr(30))
    trunc.write_bytes(trunc.read_bytes()[:-1000])
    (root / "text.dcm").write_text("this is a report, not an image\n")
    mpeg = dicom_dataset(mr(31))
    mpeg.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    mpeg.PixelData = encapsulate([b"\0" * 64])
    mpeg.save_as(root / "mpeg.dcm", enforce_file_format=True)
    lines += [
        ["mf.dcm", 1, "train"],
        ["vol.nii.gz", "", "train"],
        ["series", 0, "val"],
        ["trunc.dcm", 0, "train"],
        ["text.dcm", 1, "train"],
        ["mpeg.dcm", 1, "train"],
        ["missing.dcm", 0, "test"],
    ]
    labels_csv(root, lines, header="path,label,split")
    return root


def test_train_split_arrays_and_row_mapping(site, cache_dir):
    data = SiteData(site, PRE, cache_dir=cache_dir)
    assert data.name == "hospital_a"
    train = data.split("train")
    # mr_0..mr_3 (1 slice each) + mf.dcm (3 frames) + vol.nii.gz (30 slices)
    assert train.images.shape == (4 + 3 + 30, 1, 16, 16) and train.images.dtype == np.float32
    assert train.labels.dtype == np.int64 and train.rows.dtype == np.int64
    paths = [data.rows[i].path for i in train.rows]
    assert paths[:7] == ["mr_0.dcm", "mr_1.dcm", "mr_2.dcm", "mr_3.dcm"] + ["mf.dcm"] * 3
    np.testing.assert_array_equal(train.labels[:7], [0, 1, 0, 1, 1, 1, 1])
    assert np.all(train.labels[7:] == -1)  # the unlabelled NIfTI
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0


def test_corrupt_files_become_problems_and_loading_goes_on(site, cache_dir, caplog):
    data = SiteData(site, PRE, cache_dir=cache_dir)
    with caplog.at_level(logging.WARNING):
        every = data.split("all")
    assert len(every.images) == 6 + 3 + 30 + 3
    reasons = {p.path: p.reason for p in data.problems}
    assert set(reasons) == CORRUPT | {"series/notes.txt"}
    assert reasons["trunc.dcm"].startswith("truncated pixel data (expected 2048 bytes, found 1048)")
    assert reasons["text.dcm"].startswith("not a DICOM file")
    assert reasons["mpeg.dcm"].startswith("unsupported compression MPEG2")
    assert reasons["missing.dcm"].startswith("file not found")
    assert all(r.endswith("skipped") for r in reasons.values())
    assert "trunc.dcm" in caplog.text and "hospital_a" in caplog.text
    data.split("all")
    assert len(data.problems) == 5  # reported once, not once per call


def test_counts_come_from_labels_csv_without_decoding(site, cache_dir, monkeypatch):
    monkeypatch.setattr(pydicom, "dcmread", _refuse)
    data = SiteData(site, PRE, cache_dir=cache_dir)
    assert data.counts() == {
        "train": {0: 3, 1: 5},
        "val": {0: 2},
        "test": {0: 1, 1: 1},
    }


def _refuse(*args, **kwargs):
    raise AssertionError("decoded although the cache should have answered")


def test_second_load_comes_from_the_cache(site, cache_dir, monkeypatch):
    first = SiteData(site, PRE, cache_dir=cache_dir).split("all")
    decoded: list[str] = []
    real_dcmread = pydicom.dcmread

    def counting_dcmread(path, *args, **kwargs):
        decoded.append(Path(path).name)
        return real_dcmread(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting_dcmread)
    monkeypatch.setattr(nibabel, "load", _refuse)
    again = SiteData(site, PRE, cache_dir=cache_dir)
    second = again.split("all")
    # Only files that failed (and so were never cached) are read again.
    assert set(decoded) <= CORRUPT
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)
    assert {p.path for p in again.problems} == CORRUPT | {"series/notes.txt"}


def test_a_split_asked_again_is_not_read_again(site, cache_dir, monkeypatch):
    data = SiteData(site, PRE, cache_dir=cache_dir)
    first = data.split("train")
    reads: list[Path] = []
    monkeypatch.setattr(data._cache, "image", lambda path, pre: reads.append(path) or _refuse())
    assert data.split("train") is first  # a simulation worker's next round: no disk reads
    assert reads == []
    data.split("val")  # another split is read as before (the per-file boundary skips _refuse)
    assert reads


def test_splits_over_the_memo_limit_are_read_each_time(site, cache_dir, monkeypatch):
    import common.data.site as site_module

    monkeypatch.setattr(site_module, "MEMO_BYTES", 0)
    data = SiteData(site, PRE, cache_dir=cache_dir)
    first = data.split("val")
    second = data.split("val")
    assert second is not first
    np.testing.assert_array_equal(second.images, first.images)


def test_cold_and_warm_cache_give_identical_bits(site, cache_dir):
    cold = SiteData(site, PRE, cache_dir=cache_dir).split("val")
    warm = SiteData(site, PRE, cache_dir=cache_dir).split("val")
    np.testing.assert_array_equal(cold.images, warm.images)


def test_damaged_cache_entries_are_decoded_again(site, cache_dir):
    first = SiteData(site, PRE, cache_dir=cache_dir).split("train")
    entries = list(cache_dir.rglob("*.npz"))
    assert entries
    for entry in entries:
        entry.write_bytes(b"garbage")
    again = SiteData(site, PRE, cache_dir=cache_dir).split("train")
    np.testing.assert_array_equal(again.images, first.images)


def test_changed_file_or_settings_miss_the_cache(site, cache_dir, dicom_file, mr):
    before = SiteData(site, PRE, cache_dir=cache_dir).split("test")
    dicom_file(site / "mr_5.dcm", mr(99))
    after = SiteData(site, PRE, cache_dir=cache_dir).split("test")
    assert not np.array_equal(before.images, after.images)
    bigger = SiteData(site, Preprocess(image_size=24), cache_dir=cache_dir).split("test")
    assert bigger.images.shape[-1] == 24


def test_site_folder_is_never_written(site, cache_dir):
    before = sorted(p for p in site.rglob("*"))
    SiteData(site, PRE, cache_dir=cache_dir).split("all")
    assert sorted(p for p in site.rglob("*")) == before
    assert not any(cache_dir.rglob(".tmp-*"))  # atomic writes leave no temporaries


def test_cache_dir_defaults_to_environment(site, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFED_CACHE_DIR", str(tmp_path / "env_cache"))
    SiteData(site, PRE).split("val")
    assert list((tmp_path / "env_cache").rglob("*.npz"))


def test_unwritable_cache_warns_and_still_loads(site, tmp_path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        val = SiteData(site, PRE, cache_dir=blocker).split("val")
    assert len(val.images) == 1 + 3
    assert "cannot write the image cache" in caplog.text


def test_masks_travel_with_their_images(tmp_path, nifti_file, labels_csv, cache_dir):
    root = tmp_path / "seg_site"
    rng = np.random.default_rng(0)
    for i in range(2):
        nifti_file(root / f"v{i}.nii", rng.random((8, 8, 4), np.float32))
        nifti_file(root / f"m{i}.nii", (rng.random((8, 8, 4)) > 0.5).astype(np.uint8))
    nifti_file(root / "short.nii", np.zeros((8, 8, 3), np.uint8))
    labels_csv(
        root,
        [["v0.nii", 0, "m0.nii", "train"], ["v1.nii", 1, "short.nii", "train"]],
        header="path,label,mask,split",
    )
    data = SiteData(root, Preprocess(image_size=8), cache_dir=cache_dir, masks=True)
    train = data.split("train")
    assert train.masks is not None and train.masks.shape == (4, 1, 8, 8)
    assert set(np.unique(train.masks)) == {0, 1}
    assert [p.path for p in data.problems] == ["short.nii"]
    assert "mask geometry does not match" in data.problems[0].reason


def test_unknown_split_name_is_rejected(site, cache_dir):
    with pytest.raises(ValueError, match="split must be one of train, val, test, all; got 'dev'"):
        SiteData(site, PRE, cache_dir=cache_dir).split("dev")


def test_empty_split_has_the_right_shapes(tmp_path, labels_csv, dicom_file, mr, cache_dir):
    dicom_file(tmp_path / "s" / "a.dcm", mr(0))
    labels_csv(tmp_path / "s", [["a.dcm", 0, "train"]], header="path,label,split")
    test = SiteData(
        tmp_path / "s", Preprocess(image_size=8, channels=3), cache_dir=cache_dir
    ).split("test")
    assert test.images.shape == (0, 3, 8, 8) and test.labels.shape == (0,)
    assert test.masks is None


def test_classification_keeps_images_whose_mask_is_broken(tmp_path, dicom_file, labels_csv, mr):
    site = tmp_path / "site"
    dicom_file(site / "a.dcm", mr(1))
    dicom_file(site / "b.dcm", mr(2))
    (site / "broken.nii.gz").write_bytes(b"not a nifti")
    labels_csv(
        site, [["a.dcm", 0, "broken.nii.gz", "train"], ["b.dcm", 1, "", "train"]],
        header="path,label,mask,split",
    )
    assert len(SiteData(site, PRE, cache_dir=tmp_path / "c").split("train").labels) == 2
    with_masks = SiteData(site, PRE, cache_dir=tmp_path / "c", masks=True)
    assert len(with_masks.split("train").labels) == 1
    assert "broken.nii.gz" in with_masks.problems[0].path
