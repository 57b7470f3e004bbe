"""Placing a decoded mask on its image's pixel grid, by geometry rather than by shape.

Two rules, in this order:

1. Both headers carry a patient frame (DICOM Image Position/Orientation and Pixel Spacing; a
   NIfTI affine other than ITK's default 2D frame): the mask is resampled onto the image's grid
   by nearest neighbour through the two frames, as ITK's ResampleImageFilter does with the
   identity transform. A mask stored in another orientation, transposed, or at another spacing
   thus lines up; one that does not overlap its image in the patient, or whose foreground
   mostly falls outside the image, is refused.
2. Otherwise (radiographs and Secondary Captures have no frame; ITK writes a 2D slice with the
   identity direction whatever its plane): one convention, the one ITK writes. A 2D NIfTI mask
   is an array (Columns, Rows) with affine diag(-1, -1, 1): its first axis runs along the
   image's columns (toward the patient's left, LPS +x), its second down the rows (LPS +y). An
   affine that says otherwise (an axis flipped or the two swapped) reorients the mask
   accordingly (`read_nifti` lays every NIfTI file out by its affine). DICOM and PNG masks
   without a frame are on the image's own pixel grid. Then rows, columns and spacing must
   match.

Neither rule can see a mask whose header is right but whose pixels were flipped before it was
written; `common.data.mask_content` looks at the pixels for that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.data.errors import ImageError
from common.data.geometry import Grid, grid_mismatch, grid_of
from common.data.nifti import is_nifti
from common.data.volume import ImageMeta

# How a mask was put on its image's grid: the card counts rows by these.
SAME_GRID = "same grid"  # both frames agree voxel for voxel
RESAMPLED = "resampled"  # mapped through the two patient frames
ITK_CONVENTION = "ITK 2D convention"  # a NIfTI mask without a frame to compare
PIXEL_GRID = "pixel grid"  # PNG, or DICOM without a frame: the image's rows and columns
SEG_REFERENCE = "SEG reference"  # DICOM SEG frames matched by referenced SOP instance
CONVENTION_NOTE = (
    "NIfTI masks without a patient frame to compare were read by ITK's 2D convention: array "
    "(Columns, Rows), affine diag(-1, -1, 1) = the image's columns and rows as stored; another "
    "affine flips or transposes the mask accordingly"
)

# A mask keeps its row when at least this share of its foreground lands inside the image ...
MIN_KEPT_FOREGROUND = 0.5
# ... and its field covers this share of the image's pixels: the rest would be trained on as
# background although nobody drew there (a mask of other slices, a shifted series).
MIN_COVERAGE = 0.95
# An index this close to a grid's half-pixel border still counts as inside (rounded headers).
_EDGE_TOLERANCE = 0.01


def align_mask(
    labels: np.ndarray, mask: Path, image: Path | None, image_meta: ImageMeta
) -> tuple[np.ndarray, str]:
    """Return `labels` ((S, R, C) as decoded from `mask`) on the image's grid, and how.

    image: the image file or series folder (None: compare shapes only).
    Raises ImageError naming both files, what was found and the fix.
    """
    mask_grid = grid_of(mask)
    image_grid = grid_of(image) if image is not None else None
    mask_frame = mask_grid.index_to_lps() if mask_grid is not None else None
    image_frame = image_grid.index_to_lps() if image_grid is not None else None
    if mask_frame is not None and image_frame is not None:
        return _resample(labels, mask_frame, image_frame, mask, image, image_meta,
                         _described(mask_grid, image_grid))
    check_shape(labels.shape, image_meta)
    mismatch = grid_mismatch(mask_grid, image_grid)
    if mismatch is not None:  # frames are not both there: only the spacing is compared
        raise ImageError(
            f"mask is not on its image's grid ({mismatch}); resample the mask onto the image "
            "(same spacing) or export it from the image"
        )
    return labels, ITK_CONVENTION if is_nifti(mask) else PIXEL_GRID


def check_shape(shape: tuple[int, ...], image: ImageMeta) -> None:
    """Raise ImageError unless `shape` (S, R, C) is the image's slices, rows and columns."""
    want = (image.slices, image.rows, image.cols)
    if tuple(int(n) for n in shape[:3]) != want:
        raise ImageError(
            f"mask geometry does not match its image ({_shapes(shape, want)}); "
            "export the mask on the image's grid"
        )


def _shapes(mask: tuple[int, ...], image: tuple[int, ...]) -> str:
    return (
        f"mask {mask[0]} slices of {mask[1]}x{mask[2]}, "
        f"image {image[0]} slices of {image[1]}x{image[2]}"
    )


def _resample(
    labels: np.ndarray,
    mask_frame: tuple[np.ndarray, np.ndarray],
    image_frame: tuple[np.ndarray, np.ndarray],
    mask: Path,
    image: Path | None,
    image_meta: ImageMeta,
    found: str,
) -> tuple[np.ndarray, str]:
    """Nearest-neighbour resampling of `labels` onto the image's (slice, row, column) grid."""
    mask_origin, mask_matrix = mask_frame
    image_origin, image_matrix = image_frame
    to_mask = np.linalg.solve(mask_matrix, image_matrix)  # image index -> mask index
    offset = np.linalg.solve(mask_matrix, image_origin - mask_origin)
    shape = (image_meta.slices, image_meta.rows, image_meta.cols)
    if tuple(labels.shape) == shape and _same_grid(to_mask, offset, slices=shape[0]):
        return labels, SAME_GRID
    names = f"mask {mask.name} and image {image.name if image is not None else '?'}"
    out = np.zeros(shape, dtype=labels.dtype)
    covered = 0
    rows, cols = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    plane = to_mask[:, 1, None, None] * rows + to_mask[:, 2, None, None] * cols
    bounds = np.array(labels.shape[:3])[:, None, None]
    for s in range(shape[0]):  # slice by slice: memory stays one image plane
        index = plane + (offset + to_mask[:, 0] * s)[:, None, None]
        nearest = np.floor(index + 0.5).astype(np.int64)
        inside = np.all(
            (index > -0.5 - _EDGE_TOLERANCE) & (index < bounds - 0.5 + _EDGE_TOLERANCE), axis=0
        )
        nearest = np.clip(nearest, 0, bounds - 1)
        covered += int(inside.sum())
        out[s][inside] = labels[nearest[0][inside], nearest[1][inside], nearest[2][inside]]
    fix = "export the mask from this image (same series and frame of reference)"
    # Said first when the shapes differ: the commonest cause, and what the user sees.
    refusal = "mask is not on its image's grid"
    if tuple(labels.shape) != shape:
        refusal = f"mask geometry does not match its image ({_shapes(labels.shape, shape)})"
    if covered == 0:
        raise ImageError(f"{refusal}: {names} do not overlap in the patient ({found}); {fix}")
    kept = _kept_foreground(labels, mask_frame, image_frame, shape)
    if kept is not None and kept < MIN_KEPT_FOREGROUND:
        raise ImageError(
            f"{refusal}: only {kept:.0%} of {names}'s foreground lies inside the image in the "
            f"patient ({found}); {fix}"
        )
    coverage = covered / float(np.prod(shape))
    if coverage < MIN_COVERAGE:
        raise ImageError(
            f"{refusal}: {names} overlap on {coverage:.0%} of the image only ({found}), and "
            f"the rest would be trained on as background; {fix}"
        )
    return out, RESAMPLED


def _same_grid(to_mask: np.ndarray, offset: np.ndarray, *, slices: int) -> bool:
    """Whether image index i is mask index i everywhere (the mapping is the identity)."""
    eye = np.eye(3)
    in_plane = np.allclose(to_mask[:, 1:], eye[:, 1:], atol=1e-3)
    # One slice each: the slab thicknesses may differ (SliceThickness against a NIfTI's 1 mm
    # z spacing) without moving any pixel.
    across = np.allclose(to_mask[:, 0], eye[:, 0], atol=1e-3) or (
        slices == 1 and np.allclose(to_mask[1:, 0], 0.0, atol=1e-3)
    )
    return bool(in_plane and across and np.allclose(offset, 0.0, atol=1e-3))


def _kept_foreground(
    labels: np.ndarray,
    mask_frame: tuple[np.ndarray, np.ndarray],
    image_frame: tuple[np.ndarray, np.ndarray],
    shape: tuple[int, int, int],
) -> float | None:
    """Share of the mask's foreground voxels whose centres fall inside the image (None: empty)."""
    foreground = np.argwhere(labels > 0)
    if len(foreground) == 0:
        return None
    mask_origin, mask_matrix = mask_frame
    image_origin, image_matrix = image_frame
    to_image = np.linalg.solve(image_matrix, mask_matrix)
    offset = np.linalg.solve(image_matrix, mask_origin - image_origin)
    index = foreground @ to_image.T + offset
    bounds = np.array(shape)
    inside = np.all(
        (index > -0.5 - _EDGE_TOLERANCE) & (index < bounds - 0.5 + _EDGE_TOLERANCE), axis=1
    )
    return float(inside.mean())


def _described(mask: Grid | None, image: Grid | None) -> str:
    """The difference between the two grids, for messages ("frames differ" when no detail)."""
    return grid_mismatch(mask, image) or "their patient frames differ"
