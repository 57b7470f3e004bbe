"""Decoding DICOM files and single-series folders into pixels in modality units.

Decoding goes through pydicom 3's pixel-data plugins (pylibjpeg, pyjpegls, openjpeg, RLE).
Every failure a hospital export can produce (not DICOM, truncated, unsupported compression,
no pixel data, not an image, invalid header values, too large, mixed series) becomes an
ImageError whose reason names the fix.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_rescale, get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from common.data.codecs import declared_frame_size
from common.data.dicom_header import PIXEL_KEYWORDS, read_header, shown, transfer_syntax
from common.data.errors import ImageError, Problem, as_image_error, described, is_file_failure
from common.data.sop import modality
from common.data.volume import ImageMeta, RawVolume

_GREY = ("MONOCHROME1", "MONOCHROME2")
# pydicom's decoders hand back YBR_FULL/YBR_FULL_422 converted to RGB (as_rgb, the default)
# and JPEG 2000 plugins apply the inverse YBR_ICT/YBR_RCT transform themselves, so after
# decoding these are all RGB; `info` reports the converted interpretation.
_RGB_LIKE = ("RGB", "YBR_ICT", "YBR_RCT")
_FIX_COMPRESSION = "ask your PACS to export uncompressed or JPEG/JPEG 2000/RLE"


def read_dicom(path: Path, *, as_labels: bool = False) -> RawVolume:
    """Decode a DICOM file, or a folder holding one DICOM series, into a RawVolume.

    as_labels: return stored values untouched (no rescale, no colour) for label maps.
    Raises ImageError with a precise reason for anything that cannot be decoded.
    """
    if path.is_dir():
        return _read_series(path, as_labels=as_labels)
    ds = read_header(path, as_labels=as_labels)
    frames, window, invert = _decode(ds, as_labels=as_labels)
    return RawVolume(frames, _meta(ds, len(frames)), window=window, invert=invert)


def _decode(ds: Dataset, *, as_labels: bool) -> tuple[np.ndarray, tuple[float, float] | None, bool]:
    """Return (float32 (F, R, C, 1|3) pixels, CT window or None, MONOCHROME1 flag)."""
    uid = transfer_syntax(ds)
    name = uid.name if uid.name != str(uid) else "unknown transfer syntax"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise ImageError(
            f"unsupported compression {name} ({uid}): no decoder installed for it; "
            f"{_FIX_COMPRESSION}"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "none available"
        raise ImageError(
            f"unsupported compression {name} ({uid}): no decoder installed ({missing}); "
            f"{_FIX_COMPRESSION}"
        )
    try:
        _check_stored_size(ds, uid, name)
        arr, info = decoder.as_array(ds)  # as_rgb=True by default: YBR_FULL* -> RGB
    except ImageError:
        raise
    # Codec plugins raise anything from ValueError to RuntimeError (or a Rust panic) on
    # damaged streams.
    except BaseException as e:
        if not is_file_failure(e):
            raise
        raise ImageError(
            f"cannot decode {name} pixel data ({described(e)}); re-export the file"
        ) from None

    frames, spp = int(info["number_of_frames"]), int(info["samples_per_pixel"])
    arr = arr.reshape(frames, int(info["rows"]), int(info["columns"]), spp)
    photometric = str(info["photometric_interpretation"])
    if as_labels:
        if spp != 1:
            raise ImageError(f"label map has {spp} colour samples per pixel; store labels as grey")
        return arr.astype(np.float32), None, False
    if photometric in _GREY:
        units = _modality_units(arr[..., 0], ds)[..., None]
        return units, _window(ds), photometric == "MONOCHROME1"
    return _to_rgb(arr, ds, photometric), None, False


def _check_stored_size(ds: Dataset, uid: UID, name: str) -> None:
    """Refuse truncated native pixel data, and codestreams that declare more than the header.

    Codec libraries allocate what the codestream declares, so that is checked before decoding.
    """
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if not uid.is_compressed:
        stored = next((ds[k].value for k in PIXEL_KEYWORDS if k in ds), None)
        if stored is not None:
            expected, found = get_expected_length(ds), len(stored)
            if found < expected:
                raise ImageError(
                    f"truncated pixel data (expected {expected} bytes, found {found}); "
                    "the copy was probably interrupted, copy or export the file again"
                )
        return
    frames = int(ds.get("NumberOfFrames") or 1)
    for index, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
        declared = declared_frame_size(frame)
        if declared is None:
            continue
        frame_rows, frame_cols, components = declared
        if frame_rows * frame_cols * components > rows * cols * samples:
            raise ImageError(
                f"{name} frame {index + 1} declares {frame_rows}x{frame_cols} pixels x "
                f"{components} components, more than the header's {rows}x{cols} x {samples}; "
                "refused before decoding (damaged or crafted file), export it again"
            )


def _to_rgb(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        rgb = np.asarray(apply_color_lut(arr[..., 0], ds))
        return rgb[..., :3].astype(np.float32)  # drop an alpha channel if the LUT has one
    if photometric in _RGB_LIKE and arr.shape[-1] == 3:
        return arr.astype(np.float32)
    raise ImageError(
        f"unsupported photometric interpretation {photometric!r} with {arr.shape[-1]} samples; "
        "export as MONOCHROME2, RGB or YBR_FULL"
    )


def _modality_units(frames: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the modality LUT / rescale (to Hounsfield units for CT), per frame if needed.

    An invalid Rescale Slope/Intercept value (DS "1A") is ignored outside CT: percentile
    scaling, used for every other modality, gives the same result with or without a linear
    rescale. CT needs Hounsfield units for its fixed window, so there it refuses the file.
    """
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_rescale(frames, ds), dtype=np.float32)
    out = frames.astype(np.float32)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        items: list[Dataset | None] = [ds] * len(out)
    else:
        # Enhanced multi-frame objects keep the rescale in functional groups, which
        # apply_rescale does not read; without this an enhanced CT would not be in HU.
        group = "PixelValueTransformationSequence"
        items = [_functional_group(ds, index, group) for index in range(len(out))]
    for index, item in enumerate(items):
        if item is None or "RescaleSlope" not in item or "RescaleIntercept" not in item:
            continue
        slope, intercept = _first_float(item.RescaleSlope), _first_float(item.RescaleIntercept)
        if slope is None or intercept is None or not np.isfinite([slope, intercept]).all():
            if modality(ds) == "CT":
                raise ImageError(
                    f"invalid Rescale Slope/Intercept (0028,1053/0028,1052) "
                    f"{shown(item.get('RescaleSlope'))}/{shown(item.get('RescaleIntercept'))}: "
                    "a CT needs them for Hounsfield units; export the file again"
                )
            continue
        with np.errstate(over="ignore"):  # an overflow to inf is refused after decoding
            out[index] = out[index].astype(np.float64) * slope + intercept
    return out


def _functional_group(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """Return the first item of `sequence` for frame `index` (per-frame, else shared)."""
    for groups, at in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if items and at < len(items) and items[at].get(sequence):
            item: Dataset = items[at].get(sequence)[0]
            return item
    return None


def _first_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value[0] if isinstance(value, list | tuple | MultiValue) else value)
    except (TypeError, ValueError, IndexError):
        return None


def _window(ds: Dataset) -> tuple[float, float] | None:
    """Return the header's first (center, width), or None when absent or unreadable."""
    try:
        return _header_window(ds)
    # A damaged window element is not worth the image: CT falls back to the soft-tissue window.
    except Exception:
        return None


def _header_window(ds: Dataset) -> tuple[float, float] | None:
    source: Dataset | None = ds if "WindowCenter" in ds else None
    if source is None:
        source = _functional_group(ds, 0, "FrameVOILUTSequence")
    if source is None:
        return None
    center = _first_float(source.get("WindowCenter"))
    width = _first_float(source.get("WindowWidth"))
    # A width below 1 is invalid per PS3.3 C.11.2.1.2; fall back to the default window.
    if center is None or width is None or not np.isfinite([center, width]).all() or width < 1:
        return None
    return center, width


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """Return (row, column) spacing in mm, or None when absent or unreadable (card: unknown)."""
    try:
        return _header_spacing(ds)
    except Exception:
        return None


def _header_spacing(ds: Dataset) -> tuple[float, float] | None:
    value = ds.get("PixelSpacing")
    if value is None:
        measures = _functional_group(ds, 0, "PixelMeasuresSequence")
        value = measures.get("PixelSpacing") if measures is not None else None
    if value is None:
        value = ds.get("ImagerPixelSpacing")  # projection radiography (CR, DX, MG)
    try:
        row, col = float(value[0]), float(value[1])
    except (TypeError, ValueError, IndexError):
        return None
    usable = np.isfinite([row, col]).all() and row > 0 and col > 0
    return (row, col) if usable else None


def _meta(ds: Dataset, slices: int, skipped: tuple[Problem, ...] = ()) -> ImageMeta:
    return ImageMeta(
        modality=modality(ds),
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        slices=slices,
        pixel_spacing=_pixel_spacing(ds),
        transfer_syntax=transfer_syntax(ds).name,
        photometric=str(ds.PhotometricInterpretation),
        skipped=skipped,
    )


def _read_series(folder: Path, *, as_labels: bool) -> RawVolume:
    """Read every file of a one-series folder, sort the slices in space and stack them."""
    datasets, skipped = series_headers(folder, as_labels=as_labels)

    volumes = []
    window: tuple[float, float] | None = None
    invert = False
    for file, ds in datasets:
        try:
            frames, file_window, invert = _decode(ds, as_labels=as_labels)
        # One broken slice would leave a gap in the volume; report the whole series.
        except BaseException as e:
            if not is_file_failure(e):
                raise
            raise ImageError(f"{file.name}: {as_image_error(e).reason}") from None
        window = window or file_window
        volumes.append(frames)
    channels = Counter(v.shape[-1] for v in volumes)
    if len(channels) > 1:
        raise ImageError("series mixes grey and colour slices; re-export the series")
    first = datasets[0][1]
    pixels = np.concatenate(volumes)
    return RawVolume(pixels, _meta(first, len(pixels), tuple(skipped)), window, invert)


def series_headers(
    folder: Path, *, as_labels: bool = False
) -> tuple[list[tuple[Path, Dataset]], list[Problem]]:
    """The DICOM files of a one-series folder in the order `read_dicom` stacks their slices.

    Returns (file, dataset) pairs sorted in space and the files left out (not DICOM images).
    Raises ImageError when the folder holds no image, several series or slices of two sizes.
    `medfed predict` uses the order to point each predicted slice at its source instance.
    """
    datasets: list[tuple[Path, Dataset]] = []
    skipped: list[Problem] = []
    # Dot files (.DS_Store, ._ resource forks) are OS litter, not data worth reporting.
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            datasets.append((file, read_header(file, as_labels=as_labels)))
        # Any failure costs this file only; the caller reports it with the site-relative path.
        except BaseException as e:
            if not is_file_failure(e):
                raise
            skipped.append(Problem(file.name, f"{as_image_error(e).reason}; skipped"))
    if not datasets:
        raise ImageError(
            f"folder holds no DICOM image files ({len(skipped)} other files); "
            "put the series' DICOM files in it"
        )
    series = Counter(_series_uid(ds) for _, ds in datasets)
    if len(series) > 1:
        listed = ", ".join(f"{uid or '(none)'} ({n} files)" for uid, n in series.most_common())
        raise ImageError(
            f"folder mixes {len(series)} series: {listed}; put each series in its own folder "
            "and list each folder in labels.csv"
        )
    shapes = Counter((int(ds.Rows), int(ds.Columns)) for _, ds in datasets)
    if len(shapes) > 1:
        listed = ", ".join(f"{r}x{c} ({n} files)" for (r, c), n in shapes.most_common())
        raise ImageError(f"series slices differ in size: {listed}; re-export the series")
    return _sorted_slices(datasets), skipped


def _series_uid(ds: Dataset) -> str:
    try:
        return str(ds.get("SeriesInstanceUID", ""))
    except Exception:  # a damaged UID groups the file with the others that have none
        return ""


def _sorted_slices(datasets: list[tuple[Path, Dataset]]) -> list[tuple[Path, Dataset]]:
    """Order slices by position along the slice normal, else InstanceNumber, else file name."""
    positions = _positions_along_normal([ds for _, ds in datasets])
    if positions is not None:
        order = np.argsort(positions, kind="stable")
        return [datasets[i] for i in order]
    try:
        return sorted(datasets, key=lambda item: int(item[1].InstanceNumber))
    # Missing, invalid or unreadable numbers: keep the file-name order.
    except Exception:
        return datasets


def _positions_along_normal(datasets: list[Dataset]) -> list[float] | None:
    """Project each ImagePositionPatient on the normal (row x column direction cosines).

    The projection, not the z coordinate, orders sagittal, coronal and oblique series too.
    """
    try:
        orientation = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        positions = [
            float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)) for ds in datasets
        ]
    # Missing, invalid or unreadable positions: the caller falls back to instance numbers.
    except Exception:
        return None
    return positions if np.linalg.norm(normal) > 0.5 else None
