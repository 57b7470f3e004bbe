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


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A randomly flipped, rotated, scaled, shifted and jittered copy of (N, C, H, W) images."""
    n = images.shape[0]
    if n == 0:
        return images

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * limit

    angle = uniform(math.radians(MAX_ROTATION_DEG))
    scale = 1 + uniform(MAX_SCALE)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    shift_x, shift_y = uniform(2 * MAX_SHIFT), uniform(2 * MAX_SHIFT)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos * flip, -sin, shift_x], dim=1),
        torch.stack([sin * flip, cos, shift_y], dim=1),
    ], dim=1).to(device=images.device, dtype=images.dtype)
    grid = nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    moved = nn.functional.grid_sample(
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    gain = (1 + uniform(MAX_GAIN)).view(n, 1, 1, 1).to(moved)
    offset = uniform(MAX_OFFSET).view(n, 1, 1, 1).to(moved)
    return moved * gain + offset


def augmented(loss_fn: LossFn, generator: torch.Generator) -> LossFn:
    """`loss_fn` on augmented images while the model trains (never when it is evaluated)."""

    def loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        images, *rest = batch
        if model.training:
            images = augment_batch(images, generator)
        return loss_fn(model, [images, *rest])

    return loss
