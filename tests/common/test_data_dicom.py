"""DICOM decoding: modality units, windowing, photometrics, frames, series, codecs, corruption."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from common.data import ImageError, Preprocess, load_image
from common.data.image import read_raw
from common.data.normalize import PERCENTILES

PRE32 = Preprocess(image_size=32)
LUMA = np.array([0.299, 0.587, 0.114])


def percentile_scaled(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, PERCENTILES)
    return np.clip((x - lo) / (hi - lo), 0, 1)


def test_mr_is_percentile_scaled_and_meta_recorded(tmp_path, dicom_file, mr):
    pixels = mr(0)
    path = dicom_file(tmp_path / "mr.dcm", pixels, PixelSpacing=[0.5, 0.7])
    loaded = load_image(path, PRE32)
    assert loaded.pixels.shape == (1, 1, 32, 32) and loaded.pixels.dtype == np.float32
    np.testing.assert_allclose(loaded.pixels[0, 0], percentile_scaled(pixels), atol=1e-6)
    meta = loaded.meta
    assert (meta.modality, meta.rows, meta.cols, meta.slices) == ("MR", 32, 32, 1)
    assert meta.pixel_spacing == (0.5, 0.7)
    assert meta.transfer_syntax == "Explicit VR Little Endian"
    assert meta.photometric == "MONOCHROME2"


def test_ct_rescaled_to_hounsfield_and_windowed(tmp_path, dicom_file):
    stored = np.full((32, 32), 512, dtype=np.uint16)  # 2 * 512 - 1024 = 0 HU
    stored[0, :4] = [0, 432, 632, 1000]  # -1024, -160, 240, 976 HU
    common = dict(modality="CT", RescaleSlope=2, RescaleIntercept=-1024)
    plain = dicom_file(tmp_path / "ct.dcm", stored, **common)
    windowed = dicom_file(
        tmp_path / "ctw.dcm", stored, WindowCenter=[0, 40], WindowWidth=[1000, 400], **common
    )
    hu = read_raw(plain).pixels[0, :, :, 0]
    np.testing.assert_array_equal(hu[0, :4], [-1024, -160, 240, 976])
    assert hu[5, 5] == 0
    # No window in the header: soft tissue, centre 40 / width 400 -> [-160, 240] HU.
    soft = load_image(plain, PRE32).pixels[0, 0]
    np.testing.assert_allclose(soft[0, :4], [0.0, 0.0, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(soft[5, 5], 160 / 400, atol=1e-6)
    # The header's first window (centre 0, width 1000) wins: 0 HU -> 0.5.
    header = load_image(windowed, PRE32).pixels[0, 0]
    np.testing.assert_allclose(header[5, 5], 0.5, atol=1e-6)
    np.testing.assert_allclose(header[0, :4], [0.0, 340 / 1000, 740 / 1000, 1.0], atol=1e-6)


def test_monochrome1_is_inverted(tmp_path, dicom_file, mr):
    pixels = mr(1)
    m1 = load_image(dicom_file(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"), PRE32)
    m2 = load_image(dicom_file(tmp_path / "m2.dcm", pixels), PRE32)
    np.testing.assert_allclose(m1.pixels, 1.0 - m2.pixels, atol=1e-6)
    assert m1.pixels[0, 0].flat[pixels.argmin()] == 1.0  # lowest stored value is brightest


def rgb_pixels() -> np.ndarray:
    yy, xx = np.mgrid[0:32, 0:32]
    return np.stack([yy * 8, xx * 8, np.full_like(xx, 40)], axis=-1).astype(np.uint8)


def test_rgb_keeps_channel_order_and_grey_is_luminance(tmp_path, dicom_file):
    rgb = rgb_pixels()
    path = dicom_file(tmp_path / "rgb.dcm", rgb, photometric="RGB", modality="XC")
    colour = load_image(path, Preprocess(image_size=32, channels=3)).pixels[0]
    grey = load_image(path, PRE32).pixels[0, 0]
    np.testing.assert_allclose(colour.transpose(1, 2, 0), percentile_scaled(rgb), atol=1e-6)
    np.testing.assert_allclose(grey, colour.transpose(1, 2, 0) @ LUMA, atol=1e-5)


def test_grey_is_repeated_for_three_channels(tmp_path, dicom_file, mr):
    path = dicom_file(tmp_path / "mr.dcm", mr(2))
    three = load_image(path, Preprocess(image_size=16, channels=3)).pixels
    assert three.shape == (1, 3, 16, 16)
    np.testing.assert_array_equal(three[:, 0], three[:, 2])


def test_palette_color_goes_through_the_lut(tmp_path, dicom_file):
    index = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # columns 0, 8, ... 248
    ramp = (np.arange(256) * 257).astype("<u2")
    lut = dict(
        RedPaletteColorLookupTableDescriptor=[256, 0, 16],
        GreenPaletteColorLookupTableDescriptor=[256, 0, 16],
        BluePaletteColorLookupTableDescriptor=[256, 0, 16],
        RedPaletteColorLookupTableData=ramp.tobytes(),
        GreenPaletteColorLookupTableData=ramp[::-1].copy().tobytes(),
        BluePaletteColorLookupTableData=np.zeros(256, "<u2").tobytes(),
    )
    path = dicom_file(
        tmp_path / "pal.dcm", index, photometric="PALETTE COLOR", modality="US", **lut
    )
    raw = read_raw(path).pixels[0]
    np.testing.assert_array_equal(raw[0, :, 0], ramp[index[0]])
    np.testing.assert_array_equal(raw[0, :, 1], ramp[::-1][index[0]])
    colour = load_image(path, Preprocess(image_size=32, channels=3)).pixels[0]
    red, green, blue = colour[:, 0]
    assert np.all(np.diff(red) > 0) and np.all(np.diff(green) < 0)
    assert np.all(blue == 0)


def test_multiframe_frames_become_slices(tmp_path, dicom_file):
    frames = np.stack([np.full((16, 24), 100 * (i + 1), np.uint16) for i in range(5)])
    frames[:, 0, 0] = 0  # some contrast inside each frame
    path = dicom_file(tmp_path / "mf.dcm", frames)
    every = load_image(path, Preprocess(image_size=16))
    assert every.pixels.shape == (5, 1, 16, 16) and every.meta.slices == 5
    means = every.pixels.mean(axis=(1, 2, 3))
    assert np.all(np.diff(means) > 0)
    center = load_image(path, Preprocess(image_size=16, slices="center"))
    np.testing.assert_array_equal(center.pixels[0], every.pixels[2])


def test_non_square_is_zero_padded_then_resized(tmp_path, dicom_file):
    pixels = np.full((16, 32), 1000, np.uint16)
    pixels[:, :16] = 2000
    loaded = load_image(dicom_file(tmp_path / "wide.dcm", pixels), Preprocess(image_size=16))
    out = loaded.pixels[0, 0]
    assert out.shape == (16, 16)
    assert np.all(out[:3] == 0) and np.all(out[-3:] == 0)  # 8 pad rows -> 4 after halving
    assert out[8, 2] > 0.9 and out[8, 13] < 0.1


def write_series(folder, dicom_file, positions, orientation, instance_numbers=None):
    for i, pos in enumerate(positions):
        pixels = np.full((16, 16), 1000 + 10 * pos, np.uint16)
        pixels[0, 0] = 0
        location = [0.0, 0.0, 0.0]
        axis = 0 if orientation[:3] == [0, 1, 0] else 2
        location[axis] = float(pos)
        attrs = dict(ImageOrientationPatient=orientation, ImagePositionPatient=location)
        if instance_numbers is not None:
            attrs["InstanceNumber"] = instance_numbers[i]
        # File names sort in yet another order than positions and instance numbers.
        dicom_file(folder / f"IM{(7 * i) % 5}.dcm", pixels, **attrs)


@pytest.mark.parametrize(
    "orientation", [[1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, -1]], ids=["axial", "sagittal"]
)
def test_series_sorted_by_position_along_normal(tmp_path, dicom_file, orientation):
    positions = [10, -5, 0, 20, 5]
    normal = np.cross(orientation[:3], orientation[3:])
    sign = 1 if normal.sum() > 0 else -1
    write_series(tmp_path / "s", dicom_file, positions, orientation, [5, 4, 3, 2, 1])
    loaded = load_image(tmp_path / "s", Preprocess(image_size=16))
    assert loaded.pixels.shape == (5, 1, 16, 16) and loaded.meta.slices == 5
    means = read_raw(tmp_path / "s").pixels[:, 1:, 1:].mean(axis=(1, 2, 3))
    expected = sorted(positions, key=lambda p: sign * p)  # ascending along the normal
    np.testing.assert_allclose(means, 1000 + 10 * np.array(expected))


def test_series_falls_back_to_instance_number(tmp_path, dicom_file):
    folder = tmp_path / "s"
    for i, number in enumerate([3, 1, 2]):
        pixels = np.full((8, 8), 100 * number, np.uint16)
        dicom_file(folder / f"f{i}.dcm", pixels, InstanceNumber=number)
    means = read_raw(folder).pixels.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(means, [100, 200, 300])


def test_series_skips_non_dicom_files_and_rejects_mixed_series(tmp_path, dicom_file, mr):
    folder = tmp_path / "s"
    write_series(folder, dicom_file, [0, 1, 2], [1, 0, 0, 0, 1, 0])
    (folder / "notes.txt").write_text("scanned on Tuesday")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    loaded = load_image(folder, Preprocess(image_size=16))
    assert loaded.meta.slices == 3
    assert [p.path for p in loaded.meta.skipped] == ["notes.txt"]
    assert "not a DICOM file" in loaded.meta.skipped[0].reason
    dicom_file(folder / "other.dcm", mr(0, (16, 16)), SeriesInstanceUID="1.2.3.999")
    with pytest.raises(ImageError, match=r"mixes 2 series.*1\.2\.3\.999 \(1 files\)"):
        load_image(folder, PRE32)


CODECS = [RLELossless, JPEGLSLossless, JPEG2000Lossless]


@pytest.mark.parametrize("syntax", CODECS, ids=lambda s: s.name)
def test_lossless_codecs_decode_exactly(tmp_path, dicom_file, mr, syntax):
    pixels = mr(3)
    plain = load_image(dicom_file(tmp_path / "plain.dcm", pixels), PRE32)
    packed = load_image(dicom_file(tmp_path / "c.dcm", pixels, syntax=syntax), PRE32)
    np.testing.assert_array_equal(packed.pixels, plain.pixels)
    assert packed.meta.transfer_syntax == syntax.name


@pytest.mark.parametrize("syntax", CODECS, ids=lambda s: s.name)
def test_lossless_codecs_decode_rgb(tmp_path, dicom_file, syntax):
    rgb = rgb_pixels()
    path = dicom_file(tmp_path / "c.dcm", rgb, photometric="RGB", modality="XC", syntax=syntax)
    np.testing.assert_array_equal(read_raw(path).pixels[0], rgb)


def test_jpeg_baseline_grey_within_codec_tolerance(tmp_path, jpeg_dicom_file):
    grey = rgb_pixels()[..., 0] // 2 + rgb_pixels()[..., 1] // 2
    raw = read_raw(jpeg_dicom_file(tmp_path / "j.dcm", grey, "MONOCHROME2")).pixels[0, :, :, 0]
    assert np.abs(raw - grey).max() <= 4


def test_jpeg_baseline_ybr_is_converted_to_rgb(tmp_path, jpeg_dicom_file):
    rgb = rgb_pixels()
    path = jpeg_dicom_file(tmp_path / "j.dcm", rgb, "YBR_FULL_422")
    raw = read_raw(path)
    error = np.abs(raw.pixels[0] - rgb)
    # Without the YCbCr -> RGB conversion the error would be around 100 grey levels.
    assert error.max() <= 12 and error.mean() < 2
    assert raw.meta.photometric == "YBR_FULL_422"
    assert raw.meta.transfer_syntax == "JPEG Baseline (Process 1)"


def test_truncated_pixel_data_names_expected_and_found_bytes(tmp_path, dicom_file, mr):
    path = dicom_file(tmp_path / "t.dcm", mr(4, (64, 64)))
    data = path.read_bytes()
    path.write_bytes(data[:-7000])
    found = 64 * 64 * 2 - 7000
    message = rf"truncated pixel data \(expected 8192 bytes, found {found}\)"
    with pytest.raises(ImageError, match=message):
        load_image(path, PRE32)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"patient list, do not share\n", "not a DICOM file"),
        (b"", r"empty file \(0 bytes\)"),
    ],
    ids=["text", "empty"],
)
def test_non_dicom_files_are_image_errors(tmp_path, content, reason):
    path = tmp_path / "scan.dcm"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        load_image(path, PRE32)


def test_missing_file_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "gone.dcm", PRE32)


@pytest.mark.parametrize(
    ("uid", "name"),
    [
        ("1.2.840.10008.1.2.4.100", "MPEG2 Main Profile / Main Level"),
        ("1.2.3.4.5.6.7", "unknown transfer syntax"),
    ],
    ids=["mpeg2", "made-up"],
)
def test_unsupported_compression_says_what_to_ask_the_pacs(tmp_path, dicom_dataset, uid, name):
    ds = dicom_dataset(np.zeros((8, 8), np.uint16))
    ds.file_meta.TransferSyntaxUID = uid
    ds.PixelData = encapsulate([b"\0" * 64])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "video.dcm"
    # A private syntax says nothing about how the header is encoded; pydicom needs telling.
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    with pytest.raises(ImageError) as caught:
        load_image(path, PRE32)
    reason = caught.value.reason
    assert reason.startswith(f"unsupported compression {name} ({uid}): no decoder installed")
    assert "ask your PACS to export uncompressed or JPEG/JPEG 2000/RLE" in reason


def test_zero_size_and_no_pixel_data(tmp_path, dicom_file, dicom_dataset, mr):
    path = dicom_file(tmp_path / "z.dcm", mr(5), Rows=0)
    with pytest.raises(ImageError, match=r"zero-size image \(Rows=0, Columns=32\)"):
        load_image(path, PRE32)
    ds = dicom_dataset(mr(5))
    del ds.PixelData
    ds.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    with pytest.raises(ImageError, match="no pixel data"):
        load_image(tmp_path / "sr.dcm", PRE32)


def test_old_file_without_preamble_or_file_meta_is_still_read(tmp_path, dicom_dataset, mr):
    pixels = mr(6)
    ds = dicom_dataset(pixels)
    del ds.file_meta
    path = tmp_path / "old.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    raw = read_raw(path)
    np.testing.assert_array_equal(raw.pixels[0, :, :, 0], pixels)
    assert raw.meta.transfer_syntax == "Implicit VR Little Endian"
