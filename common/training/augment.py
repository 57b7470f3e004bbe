"""Per-sample augmentation of a training batch: flips, small affine moves, intensity jitter.

Each image gets its own random transform (one `affine_grid` / `grid_sample` over the batch), so
the batch's samples stay independent, as DP-SGD's per-sample gradients require; the
augmentation is data-independent randomness, so the privacy accounting is unchanged.

The ranges are the conventional light ones for radiographs and ultrasound (CheXNet trained with
random horizontal flips): a left-right flip, rotation within +-10 degrees, scaling within
+-10%, translation within +-8% of the image, and a brightness gain and offset within +-10% of
the standardised intensity. Nothing here moves a finding out of the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

MAX_ROTATION_DEG = 10.0
MAX_SCALE = 0.10
MAX_SHIFT = 0.08  # of the image's half-width, in affine_grid's [-1, 1] coordinates: x 2
MAX_GAIN = 0.10
MAX_OFFSET = 0.10

LossFn = Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor]


def _affine(n: int, generator: torch.Generator, dims: int, *, flip: bool) -> torch.Tensor:
    """(n, dims, dims + 1) random affine_grid matrices.

    Rotation in the plane of the last two axes, isotropic scale, shift, and (with `flip`) a
    mirror of the last axis (left-right).
    """

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * limit

    angle = uniform(math.radians(MAX_ROTATION_DEG))
    scale = 1 + uniform(MAX_SCALE)
    mirror = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    if not flip:
        mirror = torch.ones(n)
    shifts = [uniform(2 * MAX_SHIFT) for _ in range(dims)]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zero = torch.zeros(n)
    # affine_grid's coordinates are (x, y[, z]): x the last axis (columns), y the rows
    rows = [
        [cos * mirror, -sin, *([zero] if dims == 3 else []), shifts[0]],
        [sin * mirror, cos, *([zero] if dims == 3 else []), shifts[1]],
    ]
    if dims == 3:
        rows.append([zero, zero, 1 / scale, shifts[2]])
    return torch.stack([torch.stack(row, dim=1) for row in rows], dim=1)


def _jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = images.shape[0]
    shape = (n,) + (1,) * (images.dim() - 1)
    gain = 1 + (torch.rand(n, generator=generator) * 2 - 1) * MAX_GAIN
    offset = (torch.rand(n, generator=generator) * 2 - 1) * MAX_OFFSET
    return images * gain.view(shape).to(images) + offset.view(shape).to(images)


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A randomly flipped, rotated, scaled, shifted and jittered copy of (N, C, H, W) images."""
    if images.shape[0] == 0:
        return images
    theta = _affine(images.shape[0], generator, 2, flip=True).to(images)
    grid = nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    moved = nn.functional.grid_sample(
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return _jitter(moved, generator)


def augment_pairs(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, *spatial) and their label maps (N, *spatial), moved together.

    The label map follows its image's transform with nearest-neighbour sampling (labels are
    classes, not intensities; outside the image is background). No mirroring: a label map may
    name the left and the right organ apart, and a mirror would swap them.
    """
    if images.shape[0] == 0:
        return images, masks
    dims = images.dim() - 2
    theta = _affine(images.shape[0], generator, dims, flip=False).to(images)
    grid = nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    moved = nn.functional.grid_sample(
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    labels = nn.functional.grid_sample(
        masks.unsqueeze(1).to(images.dtype), grid, mode="nearest", padding_mode="zeros",
        align_corners=False,
    )
    return _jitter(moved, generator), labels.squeeze(1).round().to(masks.dtype)


def augmented(loss_fn: LossFn, generator: torch.Generator) -> LossFn:
    """`loss_fn` on augmented images while the model trains (never when it is evaluated)."""

    def loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        images, *rest = batch
        if model.training:
            images = augment_batch(images, generator)
        return loss_fn(model, [images, *rest])

    return loss


def augmented_pairs(loss_fn: LossFn, generator: torch.Generator) -> LossFn:
    """`loss_fn` on augmented (image, label map) pairs while the model trains."""

    def loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        images, masks = batch
        if model.training:
            images, masks = augment_pairs(images, masks, generator)
        return loss_fn(model, [images, masks])

    return loss
