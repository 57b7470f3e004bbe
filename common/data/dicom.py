"""Decoding DICOM files and single-series folders into pixels in modality units.

Decoding goes through pydicom 3's pixel-data plugins (pylibjpeg, pyjpegls, openjpeg, RLE).
Every failure a hospital export can produce (not DICOM, truncated, unsupported compression,
no pixel data, mixed series) becomes an ImageError whose reason names the fix.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_rescale, get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from common.data.errors import ImageError, Problem
from common.data.volume import ImageMeta, RawVolume

_GREY = ("MONOCHROME1", "MONOCHROME2")
# pydicom's decoders hand back YBR_FULL/YBR_FULL_422 converted to RGB (as_rgb, the default)
# and JPEG 2000 plugins apply the inverse YBR_ICT/YBR_RCT transform themselves, so after
# decoding these are all RGB; `info` reports the converted interpretation.
_RGB_LIKE = ("RGB", "YBR_ICT", "YBR_RCT")
# (implicit VR, little endian) -> the native transfer syntax with that encoding
_SYNTAX_BY_ENCODING: dict[tuple[bool | None, bool | None], UID] = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}
_FIX_COMPRESSION = "ask your PACS to export uncompressed or JPEG/JPEG 2000/RLE"


def read_dicom(path: Path, *, as_labels: bool = False) -> RawVolume:
    """Decode a DICOM file, or a folder holding one DICOM series, into a RawVolume.

    as_labels: return stored values untouched (no rescale, no colour) for label maps.
    Raises ImageError with a precise reason for anything that cannot be decoded.
    """
    if path.is_dir():
        return _read_series(path, as_labels=as_labels)
    ds = read_header(path)
    frames, window, invert = _decode(ds, as_labels=as_labels)
    return RawVolume(frames, _meta(ds, len(frames)), window=window, invert=invert)


def read_header(path: Path) -> Dataset:
    """Parse a DICOM file that should hold an image; pixel data is checked but not decoded."""
    if not path.exists():
        raise ImageError("file not found; fix the path in labels.csv or restore the file")
    size = path.stat().st_size
    if size == 0:
        raise ImageError("empty file (0 bytes); re-export it from the PACS")
    try:
        ds: Dataset = pydicom.dcmread(path)
    except InvalidDicomError:
        ds = _read_without_preamble(path)
    # pydicom raises many exception types on damaged headers; any of them means unreadable.
    except Exception as e:
        raise ImageError(f"unreadable DICOM header ({e}); re-export the file") from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = getattr(UID(str(ds.get("SOPClassUID", ""))), "name", "") or "object"
        raise ImageError(
            f"no pixel data: this DICOM {kind} holds no image; remove it from labels.csv"
        )
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows == 0 or cols == 0:
        raise ImageError(f"zero-size image (Rows={rows}, Columns={cols}); re-export the file")
    if "PhotometricInterpretation" not in ds:
        raise ImageError("missing Photometric Interpretation (0028,0004); re-export the file")
    return ds


def _read_without_preamble(path: Path) -> Dataset:
    """Accept old DICOM files written without the 128-byte preamble, reject everything else."""
    try:
        ds = pydicom.dcmread(path, force=True)
        looks_like_image = "Rows" in ds and "Columns" in ds and "PixelData" in ds
    # Forcing a parse of a text or JPEG file fails in arbitrary ways; all mean "not DICOM".
    except Exception:
        looks_like_image = False
    if not looks_like_image:
        raise ImageError(
            f"not a DICOM file (no 'DICM' marker, {path.stat().st_size} bytes); "
            "remove it or export the image as DICOM"
        )
    if "TransferSyntaxUID" not in ds.file_meta:
        # The decoders need a transfer syntax; take the encoding the reader detected.
        ds.file_meta.TransferSyntaxUID = _SYNTAX_BY_ENCODING.get(
            ds.original_encoding, ExplicitVRLittleEndian
        )
    return ds


def transfer_syntax(ds: Dataset) -> UID:
    """Return the dataset's transfer syntax UID."""
    return UID(str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)))


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
    if not uid.is_compressed and "PixelData" in ds:
        expected, found = get_expected_length(ds), len(ds.PixelData)
        if found < expected:
            raise ImageError(
                f"truncated pixel data (expected {expected} bytes, found {found}); "
                "the copy was probably interrupted, copy or export the file again"
            )
    try:
        arr, info = decoder.as_array(ds)  # as_rgb=True by default: YBR_FULL* -> RGB
    # Codec plugins raise anything from ValueError to RuntimeError on damaged streams.
    except Exception as e:
        raise ImageError(f"cannot decode {name} pixel data ({e}); re-export the file") from None

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
    """Apply the modality LUT / rescale (to Hounsfield units for CT), per frame if needed."""
    if "ModalityLUTSequence" in ds or ("RescaleSlope" in ds and "RescaleIntercept" in ds):
        return np.asarray(apply_rescale(frames, ds), dtype=np.float32)
    # Enhanced multi-frame objects keep the rescale in functional groups, which
    # apply_rescale does not read; without this an enhanced CT would not be in HU.
    out = frames.astype(np.float32)
    for index in range(len(out)):
        item = _functional_group(ds, index, "PixelValueTransformationSequence")
        if item is not None and "RescaleSlope" in item and "RescaleIntercept" in item:
            out[index] = out[index] * float(item.RescaleSlope) + float(item.RescaleIntercept)
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
    source: Dataset | None = ds if "WindowCenter" in ds else None
    if source is None:
        source = _functional_group(ds, 0, "FrameVOILUTSequence")
    if source is None:
        return None
    center = _first_float(source.get("WindowCenter"))
    width = _first_float(source.get("WindowWidth"))
    # A width below 1 is invalid per PS3.3 C.11.2.1.2; fall back to the default window.
    if center is None or width is None or width < 1:
        return None
    return center, width


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
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
    return (row, col) if row > 0 and col > 0 else None


def _meta(ds: Dataset, slices: int, skipped: tuple[Problem, ...] = ()) -> ImageMeta:
    modality = str(ds.get("Modality", "")).strip().upper() or None
    return ImageMeta(
        modality=modality,
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
    datasets: list[tuple[Path, Dataset]] = []
    skipped: list[Problem] = []
    # Dot files (.DS_Store, ._ resource forks) are OS litter, not data worth reporting.
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            datasets.append((file, read_header(file)))
        except ImageError as e:
            # Reported (and logged) by the caller, which knows the path relative to the site.
            skipped.append(Problem(file.name, f"{e.reason}; skipped"))
    if not datasets:
        raise ImageError(
            f"folder holds no DICOM image files ({len(skipped)} other files); "
            "put the series' DICOM files in it"
        )
    series = Counter(str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets)
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

    volumes = []
    window: tuple[float, float] | None = None
    invert = False
    for file, ds in _sorted_slices(datasets):
        try:
            frames, file_window, invert = _decode(ds, as_labels=as_labels)
        except ImageError as e:
            # One broken slice would leave a gap in the volume; report the whole series.
            raise ImageError(f"{file.name}: {e.reason}") from None
        window = window or file_window
        volumes.append(frames)
    channels = Counter(v.shape[-1] for v in volumes)
    if len(channels) > 1:
        raise ImageError("series mixes grey and colour slices; re-export the series")
    first = datasets[0][1]
    pixels = np.concatenate(volumes)
    return RawVolume(pixels, _meta(first, len(pixels), tuple(skipped)), window, invert)


def _sorted_slices(datasets: list[tuple[Path, Dataset]]) -> list[tuple[Path, Dataset]]:
    """Order slices by position along the slice normal, else InstanceNumber, else file name."""
    positions = _positions_along_normal([ds for _, ds in datasets])
    if positions is not None:
        order = np.argsort(positions, kind="stable")
        return [datasets[i] for i in order]
    try:
        return sorted(datasets, key=lambda item: int(item[1].InstanceNumber))
    except (AttributeError, TypeError, ValueError):
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
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    return positions if np.linalg.norm(normal) > 0.5 else None
