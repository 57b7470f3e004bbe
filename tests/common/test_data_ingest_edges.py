"""Files an archive holds that are not plain good images: each is read or named, never fatal.

Issue 20 (any exception is one file's problem, preamble-less DICOM, non-finite pixels, non-image
objects, Analyze/MGH) and issue 18 (a decoded-size cap that refuses decompression bombs).
"""

from __future__ import annotations

import os

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    RLELossless,
    RTDoseStorage,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from typer.testing import CliRunner

import common.data.dicom as dicom_module
import common.data.image as image_module
from common.data import ImageError, SiteData, check_site, load_image, load_mask
from common.data.image import read_raw
from medfed.cli import app
from tests.common.ingest_files import (
    PRE,
    file_bytes,
    float_dataset,
    patch_value,
    problems_of,
    site_with,
    with_raw_values,
    without_preamble,
)

# 1. Any exception while reading one file is that file's problem.


def test_invalid_is_value_is_named_and_the_site_goes_on(
    tmp_path, dicom_file, labels_csv, mr, monkeypatch
):
    # The file: an IS element reading "1A" raised TypeError deep in _decode.
    site = tmp_path / "site"
    with_raw_values(dicom_file(site / "bad_is.dcm", mr(9)), NumberOfFrames=b"1A")
    site_with(site, labels_csv, dicom_file, mr, ["bad_is.dcm"])
    with pytest.raises(ImageError, match=r"invalid Number of Frames \(0028,0008\) value '1A'"):
        load_image(site / "bad_is.dcm", PRE)
    card = check_site(site, PRE, cache_dir=tmp_path / "cache")
    assert card.usable and card.readable_rows == 4
    assert "Number of Frames" in problems_of(card)["bad_is.dcm"]
    monkeypatch.setenv("MEDFED_CACHE_DIR", str(tmp_path / "cli-cache"))
    result = CliRunner().invoke(app, ["check-data", str(site)])
    assert result.exit_code == 0, result.output
    assert "bad_is.dcm: invalid Number of Frames" in result.output


def test_invalid_values_in_non_essential_tags_are_tolerated(tmp_path, dicom_file, mr):
    pixels = mr(1)
    path = dicom_file(tmp_path / "mr.dcm", pixels, RescaleSlope=1, RescaleIntercept=0)
    with_raw_values(
        path,
        InstanceNumber=b"1A",
        PixelSpacing=b"a\\b",
        WindowCenter=b"x ",
        WindowWidth=b"y ",
        RescaleSlope=b"1A",
    )
    raw = read_raw(path)
    # Percentile scaling ignores a linear rescale, so MR pixels are unaffected.
    np.testing.assert_array_equal(raw.pixels[0, :, :, 0], pixels)
    assert raw.meta.pixel_spacing is None
    # A CT needs its rescale for Hounsfield units: refused, naming the elements.
    ct = dicom_file(tmp_path / "ct.dcm", pixels, modality="CT", RescaleSlope=1, RescaleIntercept=0)
    with_raw_values(ct, RescaleIntercept=b"-1O24")
    with pytest.raises(ImageError, match=r"invalid Rescale Slope/Intercept.*'-1O24'"):
        read_raw(ct)


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (TypeError("'<' not supported between instances of 'int' and 'str'"), "TypeError: '<'"),
        (MemoryError(), "out of memory while decoding (MemoryError"),
        (KeyError("PixelData"), "KeyError: 'PixelData'"),
    ],
    ids=["TypeError", "MemoryError", "KeyError"],
)
def test_any_exception_from_a_reader_skips_only_that_file(
    tmp_path, dicom_file, labels_csv, mr, monkeypatch, error, shown
):
    # Fault injection: a reader bug not yet known must still cost one file, named.
    site = site_with(tmp_path / "site", labels_csv, dicom_file, mr, ["victim.dcm"])
    dicom_file(site / "victim.dcm", mr(8))
    real_decode = dicom_module._decode

    def failing_decode(ds, *, as_labels):
        if ds.filename.endswith("victim.dcm"):
            raise error
        return real_decode(ds, as_labels=as_labels)

    monkeypatch.setattr(dicom_module, "_decode", failing_decode)
    card = check_site(site, PRE, cache_dir=tmp_path / "cache")
    assert card.usable and card.readable_rows == 4
    reason = problems_of(card)["victim.dcm"]
    assert shown in reason and reason.endswith("skipped")


def test_an_exception_after_decoding_is_caught_at_the_site_boundary(
    tmp_path, dicom_file, labels_csv, mr, monkeypatch
):
    site = site_with(tmp_path / "site", labels_csv, dicom_file, mr, ["wide.dcm"])
    dicom_file(site / "wide.dcm", mr(7, (16, 48)))
    real = image_module.pad_to_square

    def failing_pad(images):
        if images.shape[-1] == 48:
            raise RuntimeError("torch: unexpected stride")
        return real(images)

    monkeypatch.setattr(image_module, "pad_to_square", failing_pad)
    data = SiteData(site, PRE, cache_dir=tmp_path / "cache")
    arrays = data.split("train")
    assert len(arrays.images) == 4
    assert [p.path for p in data.problems] == ["wide.dcm"]
    assert "RuntimeError: torch: unexpected stride" in data.problems[0].reason


# What the fuzz test (test_fuzz_ingest.py) found, kept as regressions.


def test_a_rust_codec_panic_is_one_files_problem(tmp_path, dicom_file, labels_csv, mr):
    # pylibjpeg-rle panics (pyo3 PanicException, a BaseException) when Columns shrinks under
    # an RLE frame; `except Exception` let it end the whole site.
    site = tmp_path / "site"
    path = dicom_file(site / "rle.dcm", mr(3, (24, 20)), syntax=RLELossless)
    ds = pydicom.dcmread(path)
    ds.Columns = 1
    ds.save_as(path)
    site_with(site, labels_csv, dicom_file, mr, ["rle.dcm"])
    card = check_site(site, PRE, cache_dir=tmp_path / "cache")
    assert card.usable and card.readable_rows == 4
    assert "PanicException: index out of bounds" in problems_of(card)["rle.dcm"]


def test_a_binary_value_of_the_wrong_length_is_named(tmp_path, dicom_file, mr):
    path = dicom_file(tmp_path / "c.dcm", mr(2))
    path.write_bytes(patch_value(path.read_bytes(), "Columns", b"\x20\x00\x00"))
    with pytest.raises(ImageError, match=r"unreadable Columns \(0028,0011\) \(BytesLength"):
        read_raw(path)


def test_an_unknown_vr_is_tolerated_or_named_by_what_it_breaks(tmp_path, dicom_file, mr):
    # pydicom parses values lazily: a damaged VR raised NotImplementedError wherever it was read.
    path = dicom_file(tmp_path / "vr.dcm", mr(2), modality="CT")
    data = path.read_bytes()
    at = data.index(b"\x08\x00\x60\x00CS")  # (0008,0060) Modality, explicit VR "CS"
    path.write_bytes(data[: at + 4] + b"Cs" + data[at + 6 :])
    assert read_raw(path).meta.modality == "CT"  # from the SOP class (CT Image Storage)
    at = data.index(b"\x28\x00\x04\x00CS")  # (0028,0004) Photometric Interpretation
    path.write_bytes(data[: at + 4] + b"Cs" + data[at + 6 :])
    with pytest.raises(ImageError, match=r"unreadable DICOM header \(NotImplementedError: "
                       r"Unknown Value Representation 'Cs'"):
        read_raw(path)


def test_library_messages_do_not_carry_the_sites_folders(tmp_path, nifti_file):
    path = nifti_file(tmp_path / "deep" / "v.nii", np.ones((12, 10, 4), np.float32))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ImageError) as caught:
        read_raw(path)
    assert "v.nii" in caught.value.reason and str(tmp_path) not in caught.value.reason


def test_a_symlink_loop_and_a_fifo_are_named_without_the_sites_folders(
    tmp_path, dicom_file, labels_csv, mr
):
    site = tmp_path / "site"
    site.mkdir()
    (site / "loop.dcm").symlink_to("loop.dcm")
    os.mkfifo(site / "fifo.dcm")  # reading it would block for ever
    site_with(site, labels_csv, dicom_file, mr, ["loop.dcm", "fifo.dcm"])
    card = check_site(site, PRE, cache_dir=tmp_path / "cache")
    problems = problems_of(card)
    assert card.readable_rows == 4
    assert "Symlink loop from 'loop.dcm'" in problems["loop.dcm"]
    assert problems["fifo.dcm"].startswith("not a regular file")
    assert str(tmp_path) not in card.to_text()


def test_a_truncated_image_object_says_truncated_not_no_image(tmp_path, dicom_file, mr):
    path = dicom_file(tmp_path / "t.dcm", mr(2), modality="CT")
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xe0\x7f\x10\x00")])  # cut before (7FE0,0010)
    with pytest.raises(ImageError, match=r"no pixel data in this CT Image Storage object .*"
                       r"probably truncated"):
        read_raw(path)


# 2. DICOM without the 128-byte preamble and 'DICM' marker.


@pytest.mark.parametrize("keep_meta", [True, False], ids=["with-meta", "no-meta"])
def test_float_pixel_data_without_preamble_is_read(tmp_path, keep_meta):
    pixels = np.linspace(-1, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    data = file_bytes(float_dataset(pixels))
    path = tmp_path / "old.dcm"
    path.write_bytes(without_preamble(data, keep_meta=keep_meta))
    raw = read_raw(path)
    np.testing.assert_array_equal(raw.pixels[0, :, :, 0], pixels)


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(200), r"not a DICOM file \(a PNG image, 208 bytes\)"),
        (bytes(range(256)) * 4, r"not a DICOM file \(no 'DICM' marker and no DICOM dataset"),
    ],
    ids=["png", "binary"],
)
def test_files_that_do_not_parse_are_still_refused_and_named(tmp_path, content, named):
    path = tmp_path / "x.dcm"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=named):
        read_raw(path)


# 3. Non-finite images are skipped with a reason.


@pytest.mark.parametrize(
    ("fill", "reason"),
    [
        (np.nan, "every pixel is NaN or infinite"),
        (np.inf, "1 of 1,024 pixels are NaN or infinite"),
    ],
    ids=["all-nan", "one-inf"],
)
def test_non_finite_dicom_float_pixels_are_refused(tmp_path, fill, reason):
    pixels = np.ones((32, 32), np.float32)
    if np.isnan(fill):
        pixels[:] = fill
    else:
        pixels[3, 4] = fill
    path = tmp_path / "f.dcm"
    path.write_bytes(file_bytes(float_dataset(pixels)))
    with pytest.raises(ImageError, match=reason):
        load_image(path, PRE)


def test_non_finite_nifti_is_refused_and_not_counted_readable(
    tmp_path, nifti_file, dicom_file, labels_csv, mr
):
    site = tmp_path / "site"
    nan = np.full((8, 8, 4), np.nan, np.float32)
    some = np.ones((8, 8, 4), np.float32)
    some[1, 2, 3] = -np.inf
    nifti_file(site / "nan.nii.gz", nan)
    nifti_file(site / "some.nii", some)
    site_with(site, labels_csv, dicom_file, mr, ["nan.nii.gz", "some.nii"])
    card = check_site(site, PRE, cache_dir=tmp_path / "cache")
    assert card.readable_rows == 4
    problems = problems_of(card)
    assert "every pixel is NaN or infinite" in problems["nan.nii.gz"]
    assert "1 of 256 pixels are NaN or infinite" in problems["some.nii"]


def test_a_rescale_that_overflows_float32_is_refused(tmp_path, dicom_file, mr):
    path = dicom_file(tmp_path / "mr.dcm", mr(2), RescaleSlope="1e300", RescaleIntercept=0)
    with pytest.raises(ImageError, match="NaN or infinite"):
        load_image(path, PRE)


# 4. Non-image DICOM objects, named by their SOP class.


@pytest.mark.parametrize(
    ("sop_class", "pixels"),
    [
        (RTDoseStorage, True),
        (SegmentationStorage, True),
        (BasicTextSRStorage, False),
        (RTStructureSetStorage, False),
        (GrayscaleSoftcopyPresentationStateStorage, False),
        (KeyObjectSelectionDocumentStorage, False),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_non_image_objects_are_named_by_sop_class(tmp_path, dicom_dataset, mr, sop_class, pixels):
    ds = dicom_dataset(mr(3), modality="OT")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    if not pixels:
        del ds.PixelData
    path = tmp_path / "obj.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageError, match=rf"^{sop_class.name}: not an image for training"):
        read_raw(path)


def test_a_seg_mask_is_refused_with_the_fix(tmp_path, dicom_dataset, dicom_file, mr):
    image = load_image(dicom_file(tmp_path / "i.dcm", mr(0)), PRE)
    ds = dicom_dataset(np.zeros((32, 32), np.uint8), modality="SEG")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    ds.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    with pytest.raises(ImageError, match="Segmentation Storage: a DICOM SEG.*convert it"):
        load_mask(tmp_path / "seg.dcm", PRE, like=image)


def test_a_presentation_state_in_a_series_folder_is_skipped(tmp_path, dicom_file, dicom_dataset):
    folder = tmp_path / "series"
    for i in range(3):
        pixels = np.full((16, 16), 100 * (i + 1), np.uint16)
        dicom_file(folder / f"s{i}.dcm", pixels, InstanceNumber=i + 1)
    ds = dicom_dataset(np.zeros((16, 16), np.uint16))
    pr = GrayscaleSoftcopyPresentationStateStorage
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pr
    del ds.PixelData
    ds.save_as(folder / "pr.dcm", enforce_file_format=True)
    loaded = load_image(folder, PRE)
    assert loaded.meta.slices == 3
    assert [(p.path, p.reason.split(":")[0]) for p in loaded.meta.skipped] == [
        ("pr.dcm", "Grayscale Softcopy Presentation State Storage")
    ]


def test_modality_missing_is_listed_as_ot_or_from_the_sop_class(
    tmp_path, dicom_file, labels_csv, mr
):
    site = tmp_path / "site"
    for name, sop_class in (("sc.dcm", SecondaryCaptureImageStorage), ("ct.dcm", CTImageStorage)):
        path = dicom_file(site / name, mr(5), modality="OT")
        ds = pydicom.dcmread(path)
        del ds.Modality
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.save_as(path)
    site_with(site, labels_csv, dicom_file, mr, ["sc.dcm", "ct.dcm"])
    card = check_site(site, PRE, cache_dir=tmp_path / "cache")
    assert card.modalities == {"MR": 4, "OT": 1, "CT": 1}
    assert "none (NIfTI)" not in card.to_text()
