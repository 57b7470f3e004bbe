"""Loading one image (DICOM file or series folder, NIfTI, Analyze, MGH) or mask as arrays.

`read_raw` is the boundary for one file: whatever a reader raises on it becomes that file's
ImageError, and pixels that are not finite are refused here, for every format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.dicom import read_dicom
from common.data.errors import ImageError, as_image_error, is_file_failure
from common.data.nifti import is_nifti, read_nifti
from common.data.sniff import has_dicm_marker
from common.data.normalize import normalise, pad_to_square, resize, select_slices, to_channels
from common.data.preprocess import Preprocess
from common.data.volume import ImageMeta, RawVolume

MAX_LABEL = 255  # masks are returned as uint8


@dataclass
class LoadedImage:
    """A decoded image: float32 (S, C, H, W) pixels in [0, 1] and how it was stored."""

    pixels: np.ndarray
    meta: ImageMeta


def read_raw(path: Path, *, as_labels: bool = False) -> RawVolume:
    """Decode `path`: a DICOM file or series folder, or a volume nibabel reads (by suffix).

    Raises ImageError for anything that cannot be used, including any unexpected exception
    (named with its class and message) and images holding NaN or infinite values.
    """
    path = Path(path)
    try:
        raw = _read(path, as_labels=as_labels)
    # MemoryError and codec panics too: one file's failure never ends the site.
    except BaseException as e:
        if not is_file_failure(e):
            raise
        raise ImageError(_without_folders(as_image_error(e).reason, path)) from None
    _check_finite(raw.pixels)
    return raw


def _without_folders(reason: str, path: Path) -> str:
    """Drop the folders from a library's message that quotes the file's full path.

    Skip reasons name files relative to the site, so that a data card can be shared without
    the hospital's directory layout.
    """
    for form in {str(path.resolve()), str(path.absolute()), str(path)}:
        reason = reason.replace(form, path.name)
    return reason


def _read(path: Path, *, as_labels: bool) -> RawVolume:
    if path.exists() and not (path.is_file() or path.is_dir()):
        # A FIFO or device would block or never end; only regular files hold images.
        raise ImageError("not a regular file (a pipe, socket or device); list image files only")
    # The DICM marker wins over the suffix: some archives name DICOM files *.img.
    if is_nifti(path) and not (path.is_file() and has_dicm_marker(path)):
        return read_nifti(path)
    return read_dicom(path, as_labels=as_labels)


def _check_finite(pixels: np.ndarray) -> None:
    """Refuse NaN/Inf pixels: normalising them would make a black image that counts as read."""
    bad = int(np.count_nonzero(~np.isfinite(pixels)))
    if bad == 0:
        return
    total = pixels.size
    which = "every pixel is" if bad == total else f"{bad:,} of {total:,} pixels are"
    raise ImageError(
        f"{which} NaN or infinite after decoding; the image holds no usable values there, "
        "export it again (or fix the tool that wrote it)"
    )


def load_image(path: Path, pre: Preprocess) -> LoadedImage:
    """Decode, normalise to [0, 1], pad to square and resize one image or volume.

    Raises ImageError(reason) when the file cannot be used.
    """
    raw = read_raw(Path(path))
    # Normalise the whole volume before picking slices so that all slices share one scale.
    pixels = normalise(raw.pixels, modality=raw.meta.modality, window=raw.window, invert=raw.invert)
    pixels = to_channels(pixels, pre.channels)
    pixels = pixels[select_slices(len(pixels), pre.slices)].transpose(0, 3, 1, 2)
    pixels = resize(pad_to_square(pixels), pre.image_size)
    return LoadedImage(pixels=np.ascontiguousarray(pixels, dtype=np.float32), meta=raw.meta)


def decode_mask(path: Path, pre: Preprocess) -> tuple[np.ndarray, ImageMeta]:
    """Decode a label map to uint8 (S, 1, H, W) with nearest-neighbour resizing.

    Returns the mask and its original geometry; `load_mask` checks that against the image.
    """
    raw = read_raw(Path(path), as_labels=True)
    finite = np.isfinite(raw.pixels)
    if not finite.all():
        # Checked first: NaN would otherwise read as "non-integer", which hides the cause.
        raise ImageError(
            f"mask holds {int(finite.size - finite.sum())} NaN or infinite values; save it as "
            "an integer label map (0 = background)"
        )
    values = np.rint(raw.pixels)
    if not np.allclose(values, raw.pixels, atol=1e-3):
        raise ImageError("mask holds non-integer values; save it as an integer label map")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > MAX_LABEL:
        raise ImageError(
            f"mask labels must be integers 0..{MAX_LABEL}, found {low:g}..{high:g}; "
            "renumber the classes"
        )
    labels = values[select_slices(len(values), pre.slices)].transpose(0, 3, 1, 2)
    labels = resize(pad_to_square(labels), pre.image_size, labels=True)
    return np.rint(labels).astype(np.uint8), raw.meta


def check_mask_geometry(mask: ImageMeta, image: ImageMeta) -> None:
    """Raise ImageError unless mask and image had the same slices, rows and columns."""
    have = (mask.slices, mask.rows, mask.cols)
    want = (image.slices, image.rows, image.cols)
    if have != want:
        raise ImageError(
            "mask geometry does not match its image "
            f"(mask {have[0]} slices of {have[1]}x{have[2]}, "
            f"image {want[0]} slices of {want[1]}x{want[2]}); "
            "export the mask on the image's grid"
        )


def load_mask(path: Path, pre: Preprocess, *, like: LoadedImage) -> np.ndarray:
    """Load the label map for image `like` as uint8 (S, 1, H, W), on the same grid.

    Raises ImageError if the mask is unreadable or its geometry (slices, rows, cols before
    resizing) differs from the image's.
    """
    mask, meta = decode_mask(path, pre)
    check_mask_geometry(meta, like.meta)
    return mask
