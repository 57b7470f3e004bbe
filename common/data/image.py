"""Loading one image (DICOM file or series folder, NIfTI, Analyze, MGH) or mask as arrays.

`read_raw` is the boundary for one file: whatever a reader raises on it becomes that file's
ImageError, and pixels that are not finite are refused here, for every format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.alignment import align_mask, check_shape
from common.data.dicom import read_dicom
from common.data.errors import ImageError, as_image_error, is_file_failure
from common.data.mask_content import check_mask_content, judgeable
from common.data.mask_formats import read_placed_mask
from common.data.nifti import is_nifti, read_nifti
from common.data.normalize import normalise, pad_to_square, resize, select_slices, to_channels
from common.data.preprocess import Preprocess
from common.data.sniff import has_dicm_marker
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


def decode_mask(
    path: Path, pre: Preprocess, *, like: ImageMeta, image: Path | None = None
) -> tuple[np.ndarray, ImageMeta, str]:
    """Decode a label map onto its image's grid as uint8 (S, 1, H, W), nearest neighbour.

    like: the image's geometry as decoded; image: its file or series folder, whose header
    places the mask (`align_mask`) and whose pixels show whether the mask is flipped
    (`check_mask_content`); None compares shapes only.
    Returns the mask, its own stored geometry and how it was placed on the image.
    """
    path = Path(path)
    placed = read_placed_mask(path, image=image)
    raw, placement = placed if placed is not None else (read_raw(path, as_labels=True), None)
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
    if raw.pixels.shape[-1] != 1:
        raise ImageError("mask has colour samples; store labels as grey, one value per pixel")
    grid = values[..., 0].astype(np.uint8)
    if placement is None:
        grid, placement = align_mask(grid, path, image, like)
    else:
        check_shape(grid.shape, like)
    if image is not None and judgeable(grid):  # an empty mask costs no second decode
        check_mask_content(grey_slices(image), grid, mask=str(path), against=str(image))
    labels = grid[select_slices(len(grid), pre.slices), None]
    labels = resize(pad_to_square(labels), pre.image_size, labels=True)
    return np.rint(labels).astype(np.uint8), raw.meta, placement


def grey_slices(image: Path) -> np.ndarray:
    """The image as grey (S, R, C) in [0, 1], as the model sees it before resizing.

    Also what `medfed predict` overlays its saliency maps on.
    """
    raw = read_raw(image)
    pixels = normalise(raw.pixels, modality=raw.meta.modality, window=raw.window,
                       invert=raw.invert)
    return to_channels(pixels, 1)[..., 0]


def load_mask(
    path: Path, pre: Preprocess, *, like: LoadedImage, image: Path | None = None
) -> np.ndarray:
    """Load the label map for image `like` as uint8 (S, 1, H, W), on the same grid.

    image: `like`'s file, for placing the mask by geometry and checking its content; without
    it only the shapes (slices, rows, columns before resizing) are compared.
    Raises ImageError if the mask is unreadable or cannot be placed on the image.
    """
    return decode_mask(path, pre, like=like.meta, image=image)[0]
