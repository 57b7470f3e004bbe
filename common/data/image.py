"""Loading one image (DICOM file, DICOM series folder or NIfTI) or mask as model-ready arrays."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.dicom import read_dicom
from common.data.errors import ImageError
from common.data.nifti import is_nifti, read_nifti
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
    """Decode `path` (NIfTI by its suffix, otherwise DICOM file or series folder)."""
    if is_nifti(path):
        return read_nifti(path)
    return read_dicom(path, as_labels=as_labels)


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
