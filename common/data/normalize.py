"""Intensity normalisation, colour-to-channel conversion, square padding and resizing.

Everything here works on whole volumes so that a volume's slices share one intensity scale.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Soft-tissue window in Hounsfield units, used for CT whose header carries no window.
SOFT_TISSUE_WINDOW = (40.0, 400.0)
PERCENTILES = (0.5, 99.5)
# ITU-R BT.601 luma weights, the ones DICOM's YBR_FULL colour space is defined with.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Turn (S, H, W, 1|3) pixels into (S, H, W, channels): luminance for grey, grey repeated."""
    have = pixels.shape[-1]
    if have == channels:
        return pixels
    if channels == 1:
        return (pixels @ _LUMA)[..., None].astype(np.float32)
    return np.repeat(pixels, channels, axis=-1)


def normalise(
    pixels: np.ndarray,
    *,
    modality: str | None,
    window: tuple[float, float] | None = None,
    invert: bool = False,
) -> np.ndarray:
    """Scale a volume to float32 [0, 1].

    CT (grey) uses the header window, else the soft-tissue window, on Hounsfield units: the
    units are physical, so a fixed window means the same tissue maps to the same value at
    every site. Everything else (MR, CR, DX, US, colour, NIfTI...) has arbitrary units and gets
    robust percentile scaling over the whole volume. invert flips MONOCHROME1 afterwards.
    """
    if modality == "CT" and pixels.shape[-1] == 1:
        center, width = window or SOFT_TISSUE_WINDOW
        out = (pixels - (center - width / 2)) / width
    else:
        out = _percentile_scale(pixels)
    out = np.clip(np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    if invert:
        out = 1.0 - out
    return out.astype(np.float32, copy=False)


def _percentile_scale(pixels: np.ndarray) -> np.ndarray:
    finite = pixels[np.isfinite(pixels)]
    if finite.size == 0:
        return np.zeros_like(pixels)
    lo, hi = (float(v) for v in np.percentile(finite, PERCENTILES))
    if hi <= lo:
        # A constant image carries no contrast; black is more honest than amplified noise.
        return np.zeros_like(pixels)
    return (pixels - lo) / (hi - lo)


def select_slices(count: int, mode: str) -> slice:
    """Return the slices to keep out of `count`: all of them, or the central one."""
    if mode == "center":
        middle = count // 2
        return slice(middle, middle + 1)
    return slice(0, count)


def pad_to_square(images: np.ndarray) -> np.ndarray:
    """Zero-pad (S, C, H, W) to (S, C, N, N), N = max(H, W), keeping the image centred."""
    height, width = images.shape[-2:]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    if top == 0 and left == 0 and height == width:
        return images
    padding = ((0, 0), (0, 0), (top, side - height - top), (left, side - width - left))
    return np.pad(images, padding)


def resize(images: np.ndarray, size: int, *, labels: bool = False) -> np.ndarray:
    """Resize square (S, C, N, N) images to (S, C, size, size).

    Intensities use anti-aliased bilinear interpolation (no moire on strong downsampling).
    Labels are resampled as nnU-Net resamples segmentations: each class's indicator is
    interpolated like an image and every pixel takes the class that covers most of it, so class
    ids are never blended and a thin structure (a vessel) stays a line where it covers half a
    pixel or more, instead of the random dots nearest-neighbour sampling leaves of it.
    """
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if labels:
        return _resize_labels(tensor, size).numpy()
    else:
        out = F.interpolate(
            tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        ).clamp_(0.0, 1.0)
    return out.numpy()


def _resize_labels(labels: torch.Tensor, size: int) -> torch.Tensor:
    """(S, C, N, N) label maps -> (S, C, size, size): the most-covering class per pixel."""
    classes = torch.unique(labels)
    best = torch.full((*labels.shape[:2], size, size), -1.0)
    out = torch.zeros_like(best)
    for label in classes.tolist():  # background (0) first: it wins a tie
        cover = F.interpolate((labels == label).float(), size=(size, size), mode="bilinear",
                              antialias=True, align_corners=False)
        wins = cover > best
        best = torch.where(wins, cover, best)
        out = torch.where(wins, torch.tensor(float(label)), out)
    return out
