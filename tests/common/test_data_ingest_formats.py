"""Analyze/MGH and other formats nibabel reads, the decoded-size cap, and real files from other
tools: each is read or named, never fatal.

Issue 20 (Analyze/MGH) and issue 18 (a decoded-size cap that refuses decompression bombs).
"""

from __future__ import annotations

import shutil
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEGLSLossless

from common.data import ImageError, check_site
from common.data.image import read_raw
from common.data.limits import MAX_IMAGE_ENV
from tests.common.ingest_files import PRE, problems_of, site_with, write_deflated

# 5. Analyze and the other formats nibabel reads.


def volume():
    return np.random.default_rng(0).normal(100, 20, (10, 20, 30)).astype(np.float32)


@pytest.mark.parametrize("listed", ["scan.hdr", "scan.img"])
def test_analyze_pair_is_read_like_the_same_nifti(tmp_path, listed):
    data = volume()
    analyze = nib.AnalyzeImage(data, np.diag([2.0, 3.0, 4.0, 1.0]))
    nib.save(analyze, tmp_path / "scan.hdr")
    stored = nib.load(tmp_path / "scan.hdr")
    nib.save(nib.Nifti1Image(data, stored.affine), tmp_path / "same.nii")
    raw = read_raw(tmp_path / listed)
    np.testing.assert_array_equal(raw.pixels, read_raw(tmp_path / "same.nii").pixels)
    assert raw.meta.transfer_syntax == "Analyze" and raw.meta.pixel_spacing == (3.0, 2.0)


def test_mgz_is_read_and_the_card_names_the_format(
    tmp_path, dicom_file, labels_csv, mr
):
    site = tmp_path / "site"
    site.mkdir()
    nib.save(nib.MGHImage(volume(), np.eye(4)), site / "brain.mgz")
    site_with(site, labels_csv, dicom_file, mr, ["brain.mgz"])
    card = check_site(site, PRE, cache_dir=tmp_path / "cache")
    assert card.problems == [] and card.readable_rows == 5
    assert card.transfer_syntaxes["MGH"] == 1 and card.modalities["none (MGH)"] == 1


def test_analyze_without_its_other_half_is_named(tmp_path):
    nib.save(nib.AnalyzeImage(volume(), np.eye(4)), tmp_path / "scan.hdr")
    (tmp_path / "scan.img").unlink()
    with pytest.raises(ImageError, match=r"needs both scan.hdr and scan.img; scan.img is missing"):
        read_raw(tmp_path / "scan.hdr")


def test_nifti_named_dcm_is_named_precisely(tmp_path, nifti_file):
    path = nifti_file(tmp_path / "v.nii", volume())
    path.rename(tmp_path / "v.dcm")
    with pytest.raises(ImageError, match=r"a NIfTI-1 file, .*rename it to end in .nii"):
        read_raw(tmp_path / "v.dcm")


# 6. The decoded-size cap (issue 18), checked before decoding.


def test_deflated_12000x12000_bomb_is_refused_before_decoding(tmp_path):
    path = write_deflated(tmp_path / "bomb.dcm", 12000, 12000)
    assert path.stat().st_size < 400_000  # the file: 281 KB on disk, 288 MB of pixels
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ImageError) as caught:
            read_raw(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    reason = caught.value.reason
    assert reason.startswith("image too large to decode: 12000x12000 pixels, 1 frame")
    assert "549 MiB as float32, above the 512 MiB cap" in reason
    assert "KB on disk" in reason and f"{MAX_IMAGE_ENV}=1024" in reason
    assert peak < 32 * 2**20, f"peak {peak / 2**20:.0f} MiB: the dataset was inflated"
    assert elapsed < 5


def test_the_deflated_writer_makes_files_that_read(tmp_path):
    raw = read_raw(write_deflated(tmp_path / "ok.dcm", 64, 48, fill=7))
    assert raw.pixels.shape == (1, 64, 48, 1) and np.all(raw.pixels == 0x0707)


def test_deflated_stream_longer_than_its_header_declares_is_refused(tmp_path):
    # 64x64 declared, 300 MB of pixel data in the stream: pydicom would inflate all of it.
    path = write_deflated(tmp_path / "long.dcm", 64, 64, pixel_bytes=300 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="inflates past the .* bytes its header declares"):
            read_raw(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20


def test_nifti_header_declaring_a_huge_volume_is_refused(tmp_path, nifti_file):
    path = nifti_file(tmp_path / "v.nii", np.zeros((4, 4, 4), np.int16))
    data = bytearray(path.read_bytes())
    data[40:56] = np.array([3, 30000, 30000, 10, 1, 1, 1, 1], "<i2").tobytes()  # dim[0..7]
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=r"image too large to decode: NIfTI header shape "
                       r"30000x30000x10 = 9,000,000,000 samples"):
        read_raw(path)


def test_the_cap_can_be_raised_and_a_bad_value_is_named(
    tmp_path, dicom_file, labels_csv, mr, monkeypatch
):
    path = dicom_file(tmp_path / "big.dcm", mr(0, (1024, 1024)))  # 4 MiB as float32
    monkeypatch.setenv(MAX_IMAGE_ENV, "1")
    with pytest.raises(ImageError, match=rf"above the 1 MiB cap.*{MAX_IMAGE_ENV}=4"):
        read_raw(path)
    monkeypatch.setenv(MAX_IMAGE_ENV, "8")
    assert read_raw(path).pixels.shape == (1, 1024, 1024, 1)
    monkeypatch.setenv(MAX_IMAGE_ENV, "lots")
    site = site_with(tmp_path / "site", labels_csv, dicom_file, mr, [])
    card = check_site(site, PRE, cache_dir=tmp_path / "cache")
    assert not card.usable and f"{MAX_IMAGE_ENV} must be a positive number" in card.reasons[0]


def test_a_codestream_declaring_more_than_the_header_is_refused(tmp_path, dicom_file, mr):
    path = dicom_file(tmp_path / "ls.dcm", mr(0), syntax=JPEGLSLossless)
    ds = pydicom.dcmread(path)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sof = frame.index(b"\xff\xf7")  # JPEG-LS SOF55: length(2) precision(1) rows(2) cols(2)
    frame[sof + 5 : sof + 9] = (4000).to_bytes(2, "big") * 2
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(path)
    with pytest.raises(ImageError, match=r"frame 1 declares 4000x4000 pixels x 1 components, "
                       r"more than the header's 32x32"):
        read_raw(path)


# Real files written by other tools (dcmtk, GDCM, scanners): the ones pydicom ships.


def test_pydicoms_own_test_files_are_read_or_named(tmp_path, labels_csv):
    source = Path(pydicom.data.__file__).parent / "test_files"
    site = tmp_path / "site"
    site.mkdir()
    names = sorted(p.name for p in source.iterdir() if p.is_file())
    for name in names:
        shutil.copy(source / name, site / name)
    labels_csv(site, [[name, i % 2, "train"] for i, name in enumerate(names)],
               header="path,label,split")
    card = check_site(site, PRE, cache_dir=tmp_path / "cache")
    problems = problems_of(card)
    assert card.usable and card.readable_rows + len(problems) == len(names)
    assert card.readable_rows >= 45
    # The file: an RT Dose whose Number of Frames reads "1A" ended check-data.
    assert problems["badVR.dcm"].startswith("RT Dose Storage: not an image for training")
    assert problems["liver_1frame.dcm"].startswith("Segmentation Storage: not an image")
    assert problems["waveform_ecg.dcm"].startswith("12-lead ECG Waveform Storage: not an image")
    assert problems["MR_truncated.dcm"].startswith("truncated pixel data")
    assert "text" in problems["README.txt"] and "gzip" in problems["zipMR.gz"]
    assert "none (NIfTI)" not in card.modalities
