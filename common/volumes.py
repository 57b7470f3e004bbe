"""Volumes as samples for `--dims 3`: each volume row of a site is one (C, D, H, W) cube.

common.data decodes a volume as slices (S, C, H, W), each resized in-plane to --image-size as a
2D image is; a slice-by-slice run concatenates them. A volume run keeps a row together and
resamples its slice axis to --image-size too (linear for intensities, nearest for labels), so
every sample is an --image-size cube and the sites' TensorDataset / Opacus path (one row = one
sample, Poisson-sampled) is unchanged. The cube is not isotropic in millimetres: a volume's
slices are stretched or squeezed to the in-plane size, as its in-plane axes already are.

Shared by the sites (training and federated evaluation) and the aggregator (held-out scores).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch.nn import functional as F

from common.config import RunConfig
from common.data import SiteData

# A row with fewer slices is an image, not a volume: stretching it into a cube would train the
# network on copies of one slice.
MIN_SLICES = 2


class VolumeError(ValueError):
    """A row of a --dims 3 run that cannot be one volume sample; the message names it."""


def resample_depth(pixels: np.ndarray, size: int, *, labels: bool = False) -> np.ndarray:
    """(S, C, H, W) slices -> (C, size, H, W): the slice axis resampled to `size`.

    Intensities are interpolated linearly between slices; labels take the nearest slice, so
    no class id is blended into another.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    volume = tensor.permute(1, 0, 2, 3).unsqueeze(0)  # (1, C, S, H, W)
    if volume.shape[2] != size:
        target = (size, *volume.shape[3:])
        if labels:
            volume = F.interpolate(volume, size=target, mode="nearest-exact")
        else:
            volume = F.interpolate(volume, size=target, mode="trilinear", align_corners=False)
    return volume[0].numpy()


def volume_samples(
    parts: Iterable[tuple[SiteData, str]], cfg: RunConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, C, D, H, W) float32 and masks (N, D, H, W) int64, one per volume with a mask.

    parts: (site data, split) pairs, read in order (one site's split, or every held-out site's).
    Raises VolumeError for a row with fewer than MIN_SLICES slices or a mask label the run's
    --num-classes cannot hold, naming the site and file.
    """
    size = cfg.image_size
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for data, split in parts:
        for loaded in data.iter_rows(split):
            if loaded.mask is None:
                continue
            path = data.rows[loaded.row_index].path
            slices = len(loaded.image.pixels)
            if slices < MIN_SLICES:
                raise VolumeError(
                    f"site {data.name}: {path} has {slices} slice; --dims 3 trains on volumes: "
                    "list volumes only, or train slice by slice with --dims 2"
                )
            label = int(loaded.mask.max())
            if label >= cfg.num_classes:
                raise VolumeError(
                    f"site {data.name}: {path}'s mask holds label {label} but the run has "
                    f"--num-classes {cfg.num_classes} (background included); pass "
                    f"--num-classes {label + 1}"
                )
            images.append(resample_depth(loaded.image.pixels, size))
            masks.append(resample_depth(loaded.mask, size, labels=True)[0])
    if not images:
        return (
            np.zeros((0, cfg.channels, size, size, size), np.float32),
            np.zeros((0, size, size, size), np.int64),
        )
    return (
        np.stack(images).astype(np.float32, copy=False),
        np.rint(np.stack(masks)).astype(np.int64),
    )


def fullest_slices(
    images: np.ndarray, masks: np.ndarray, predicted: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per volume, the axial slice with the most true structure (the middle one if none).

    images (N, C, D, H, W), masks and predicted (N, D, H, W) -> (N, C, H, W), (N, H, W),
    (N, H, W): what a 2D overlay of each volume shows.
    """
    area = masks.reshape(*masks.shape[:2], -1).astype(bool).sum(axis=2)  # (N, D)
    chosen = np.where(area.max(axis=1) > 0, area.argmax(axis=1), masks.shape[1] // 2)
    rows = np.arange(len(masks))
    return images[rows, :, chosen], masks[rows, chosen], predicted[rows, chosen]
