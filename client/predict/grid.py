"""Predictions back on the source image's grid, and written as NIfTI the way masks are read.

The model sees an image padded to a square and resized (`common.data.image.load_image`; a
`--dims 3` model also sees its slice axis resampled, `common.volumes`). Every map predict writes
undoes both, so a pixel of a map is the pixel of the image a reader opens.

NIfTI maps follow medfed's mask convention (`common.data.alignment`): where the image has a
patient frame, the file carries it (voxel (column, row, slice) to RAS, as `medfed synth` writes
masks), so any viewer overlays it and `medfed check-data` would place it as a mask; without a
frame, ITK's 2D convention (array (columns, rows), affine diag(-1, -1, 1) times the spacing).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.nn import functional as F

from common.data.geometry import Grid, grid_of

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def to_source(maps: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(S, K, n, n) maps on the model's grid -> (S, K, rows, cols) on the source's.

    Bilinear (anti-aliased when shrinking), then the zero padding `pad_to_square` added is cut
    away, so probabilities stay probabilities and a map's maximum stays where it was.
    """
    side = max(rows, cols)
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    if tensor.shape[-1] != side:
        tensor = F.interpolate(
            tensor, size=(side, side), mode="bilinear", align_corners=False,
            antialias=side < tensor.shape[-1],
        )
    top, left = (side - rows) // 2, (side - cols) // 2
    return tensor[..., top : top + rows, left : left + cols].numpy()


def depth_to_source(maps: np.ndarray, slices: int) -> np.ndarray:
    """(K, D, n, n) maps of a volume model -> (slices, K, n, n): the slice axis resampled back."""
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    if tensor.shape[2] != slices:
        tensor = F.interpolate(
            tensor, size=(slices, *tensor.shape[3:]), mode="trilinear", align_corners=False
        )
    return tensor[0].permute(1, 0, 2, 3).numpy()


def affine_for(grid: Grid | None) -> np.ndarray:
    """The RAS affine of a (column, row, slice) array on an image of this grid."""
    placed = grid.index_to_lps() if grid is not None else None
    if grid is not None and placed is not None:
        origin, matrix = placed  # columns: slice, row, column steps (LPS mm)
        affine = np.eye(4)
        affine[:3, 0] = _LPS_TO_RAS @ matrix[:, 2]
        affine[:3, 1] = _LPS_TO_RAS @ matrix[:, 1]
        affine[:3, 2] = _LPS_TO_RAS @ matrix[:, 0]
        affine[:3, 3] = _LPS_TO_RAS @ origin
        return affine
    row, col = grid.spacing if grid is not None and grid.spacing else (1.0, 1.0)
    return np.diag([-col, -row, 1.0, 1.0])


def write_map(path: Path, volume: np.ndarray, source: Path) -> Path:
    """Write (S, R, C) or (S, R, C, K) `volume` as NIfTI on the grid of image `source`.

    Integers are stored as uint8 labels. Maps in [0, 1] (probabilities, saliency) are stored as
    uint8 (256 levels) with the NIfTI scale slope, so readers get floats back: a CT volume's
    probability maps would otherwise cost four bytes per voxel and class for a precision no
    reader sees.
    """
    data = np.ascontiguousarray(np.swapaxes(volume, 0, 2))  # (C, R, S, ...)
    affine = affine_for(grid_of(source))
    if np.issubdtype(volume.dtype, np.integer):
        image = nib.Nifti1Image(data.astype(np.uint8), affine)
    else:
        image = nib.Nifti1Image(np.clip(data, 0.0, 1.0).astype(np.float32), affine)
        image.set_data_dtype(np.uint8)  # nibabel sets the slope and intercept that fit
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path
