"""Refusing a mask whose outline follows its image's edges better flipped or rotated.

A header can be right while the pixels are not: a tool that flipped the array before writing
it, or a mask exported from another view. Geometry cannot see that, the pixels can. A correct
mask's boundary runs along edges of the image (an organ's outline), so the image's gradient
there points across the boundary. For the mask as stored and for each flip or rotation that
keeps its rows and columns (4; 8 when the image is square) this measures the mean gradient
flux through the mask's boundary, |grad I . n|, in units of the image's mean gradient
magnitude. The mask is refused only when another transform fits clearly better
(`MARGIN` times) and the stored one fits poorly (below `POOR`), so that

- mirror-image anatomy (two lungs, two hippocampi) is not called flipped: its flipped mask
  fits about as well as the stored one;
- low-contrast structures whose outline barely shows pass: no transform fits clearly better;
- empty and tiny masks (under `MIN_FOREGROUND` pixels or `MIN_SHARE` of the image) are not
  judged.

Measured on every row of the MSD hippocampus slices (../shared/data) and on phantom
radiographs with lung masks: see README "Masks".
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from common.data.errors import ImageError

# The check works on images resized to this longest side: detail enough for an outline and a
# few milliseconds per transform, whatever the stored size (a 3000 px radiograph or a 40 px
# MR crop, which is upsampled so that the 1-pixel smoothing stays finer than the structure).
WORK_SIDE = 192
SIGMA = 1.0  # Gaussian derivative scale on the working image, in pixels
MARGIN = 1.75  # another transform must fit this many times better than the stored mask
POOR = 2.0  # ... and the stored mask's flux below twice the image's mean gradient
# Below either size a mask is not judged: a small lesion's outline is a few pixels long, and
# some flip of it lands on a vessel or a rib edge by chance.
MIN_FOREGROUND = 50  # foreground pixels on the working grid
MIN_SHARE = 0.005  # foreground share of the judged slices
MAX_SLICES = 5  # a volume is judged on its slices with the most foreground

Transform = Callable[[np.ndarray], np.ndarray]
# Each acts on the last two axes (rows, columns); names read "mask ... appears <name>".
_KEEP_SHAPE: dict[str, Transform] = {
    "flipped left-right": lambda a: a[..., :, ::-1],
    "flipped up-down": lambda a: a[..., ::-1, :],
    "rotated 180 degrees": lambda a: a[..., ::-1, ::-1],
}
_SQUARE_ONLY: dict[str, Transform] = {
    "transposed (rows and columns swapped)": lambda a: np.swapaxes(a, -1, -2),
    "rotated 90 degrees": lambda a: np.rot90(a, 1, axes=(-2, -1)),
    "rotated 270 degrees": lambda a: np.rot90(a, 3, axes=(-2, -1)),
    "transposed about the other diagonal": lambda a: np.rot90(np.swapaxes(a, -1, -2), 2,
                                                             axes=(-2, -1)),
}
IDENTITY = "as stored"


def transforms(square: bool) -> dict[str, Transform]:
    """The stored mask and every flip or rotation keeping its shape (8 if square, else 4)."""
    found: dict[str, Transform] = {IDENTITY: lambda a: a, **_KEEP_SHAPE}
    return {**found, **_SQUARE_ONLY} if square else found


def judgeable(labels: np.ndarray) -> bool:
    """Whether a mask is large enough to judge, before its image is decoded for the check."""
    chosen = labels[_busiest_slices(labels)] > 0
    return bool(chosen.any()) and float(chosen.mean()) >= MIN_SHARE


def edge_scores(image: np.ndarray, labels: np.ndarray) -> dict[str, float] | None:
    """Boundary flux of each transform of the mask, in units of the image's mean gradient.

    image: grey (S, R, C) in [0, 1]; labels: (S, R, C) on the image's grid (0 = background).
    Returns None when the mask is too small to judge.
    """
    chosen = _busiest_slices(labels)
    picture, mask = _working_size(image[chosen], labels[chosen] > 0)
    if int(mask.sum()) < MIN_FOREGROUND or float(mask.mean()) < MIN_SHARE:
        return None
    grad_rows = np.stack([ndimage.gaussian_filter(p, SIGMA, order=(1, 0)) for p in picture])
    grad_cols = np.stack([ndimage.gaussian_filter(p, SIGMA, order=(0, 1)) for p in picture])
    mean = float(np.hypot(grad_rows, grad_cols).mean())
    if mean <= 1e-6:
        return None  # a flat image has no edges to follow
    square = picture.shape[-1] == picture.shape[-2]
    return {
        name: _flux(grad_rows, grad_cols, move(mask)) / mean
        for name, move in transforms(square).items()
    }


def check_mask_content(image: np.ndarray, labels: np.ndarray, *, mask: str, against: str) -> None:
    """Raise ImageError when `labels` fits `image` clearly better flipped or rotated.

    mask / against: the names the message gives the two files.
    """
    scores = edge_scores(image, labels)
    if scores is None:
        return
    stored = scores[IDENTITY]
    name, best = max(((k, v) for k, v in scores.items() if k != IDENTITY), key=lambda kv: kv[1])
    if stored < POOR and best >= MARGIN * stored:
        raise ImageError(
            f"mask {mask} appears {name} against {against}: its outline follows the image's "
            f"edges {best / max(stored, 1e-9):.1f}x better {name} (edge score {best:.2f}, "
            f"{stored:.2f} as stored, 1 = the image's mean gradient); export the mask again "
            "from this image, or fix the tool that flipped it"
        )


def _busiest_slices(labels: np.ndarray) -> np.ndarray:
    area = (labels > 0).reshape(len(labels), -1).sum(axis=1)
    return np.sort(np.argsort(-area, kind="stable")[:MAX_SLICES])


def _working_size(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Resize (S, R, C) slices to `WORK_SIDE` on their longest side (bilinear / nearest)."""
    rows, cols = image.shape[-2:]
    scale = WORK_SIDE / max(rows, cols)
    size = (max(1, round(rows * scale)), max(1, round(cols * scale)))
    zoom = (size[0] / rows, size[1] / cols)
    picture = image.astype(np.float64)
    block = int(1 / scale) if scale < 1 else 1
    if block > 1:  # block means first: anti-aliased and cheap on a 3000 px radiograph
        r, c = rows - rows % block, cols - cols % block
        picture = picture[:, :r, :c].reshape(len(picture), r // block, block, c // block, block)
        picture = picture.mean(axis=(2, 4))
    factor = (size[0] / picture.shape[1], size[1] / picture.shape[2])
    picture = ndimage.zoom(picture, (1, *factor), order=1, mode="nearest", grid_mode=True)
    # Nearest neighbour by pixel centres, as the model's own label resizing does.
    at_rows = np.minimum((np.arange(size[0]) + 0.5) / zoom[0], rows - 1).astype(np.int64)
    at_cols = np.minimum((np.arange(size[1]) + 0.5) / zoom[1], cols - 1).astype(np.int64)
    return picture, mask[:, at_rows[:, None], at_cols[None, :]]


def _flux(grad_rows: np.ndarray, grad_cols: np.ndarray, mask: np.ndarray) -> float:
    """Mean |grad I . n| over the mask's boundary, n its unit normal, weighted by edge strength."""
    total, weight = 0.0, 0.0
    for g_r, g_c, m in zip(grad_rows, grad_cols, mask, strict=True):
        if not m.any():
            continue
        smooth = ndimage.gaussian_filter(m.astype(np.float64), 1.0)
        n_r, n_c = ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1)
        strength = np.hypot(n_r, n_c)
        boundary = strength > 0.05 * strength.max()
        w = strength[boundary]
        flux = np.abs(g_r[boundary] * n_r[boundary] + g_c[boundary] * n_c[boundary]) / w
        total += float((flux * w).sum())
        weight += float(w.sum())
    return total / weight if weight > 0 else 0.0
