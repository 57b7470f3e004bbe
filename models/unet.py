"""A U-Net for segmentation, 2D (slices) or 3D (volumes), with GroupNorm so Opacus accepts it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from models.layers import check_encoder_args, conv, double_conv, max_pool


class DoubleConv(nn.Sequential):
    """Two 3x3(x3) convolutions, each followed by GroupNorm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, dims: int) -> None:
        super().__init__(*double_conv(in_channels, out_channels, dims=dims))


class UNet(nn.Module):
    """U-Net (Ronneberger et al.) returning per-pixel class logits.

    Input (N, in_channels, *spatial) with `dims` spatial axes; output (N, num_classes,
    *spatial). Every spatial size must be divisible by 2**depth.

    Args:
        num_classes: segmentation classes, background included (a lesion mask: 2).
        width: channels of the first level; each deeper level doubles it.
        depth: down-sampling steps; the deepest level sees image_size / 2**depth pixels.
            DP-SGD's noise grows with the parameter count (width 8: 30k parameters at depth 2,
            121k at depth 3), so the run's planner (common.seg_plan) picks the smallest that
            sees the structures whole.
        dims: 2 for images and slices, 3 for volumes.
        class_prior: each class's share of the pixels (background first), which the output
            layer starts from (the prior initialisation of Lin et al.'s focal loss): from an
            even start the first steps go into learning how common each class is, and a
            federation with DP-SGD has few steps to spare. None: an even start.

    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 2,
        image_size: int = 64,
        width: int = 8,
        depth: int = 2,
        dims: int = 2,
        class_prior: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_encoder_args(
            dims=dims, in_channels=in_channels, image_size=image_size, depth=depth, net="U-Net"
        )
        if num_classes < 2:
            raise ValueError(
                f"num_classes must be >= 2 (background and at least one structure), "
                f"got {num_classes}"
            )
        if class_prior is not None and (
            len(class_prior) != num_classes or not all(0 < p < 1 for p in class_prior)
        ):
            raise ValueError(
                f"class_prior must give each of the {num_classes} classes a share in (0, 1), "
                f"got {list(class_prior)}"
            )
        self.dims, self.depth, self.in_channels = dims, depth, in_channels
        self.down = nn.ModuleList()
        channels, skips = in_channels, []
        for level in range(depth):
            out = width * 2**level
            self.down.append(DoubleConv(channels, out, dims=dims))
            skips.append(out)
            channels = out
        self.pool = max_pool(dims)(2)
        self.bottom = DoubleConv(channels, channels * 2, dims=dims)
        channels *= 2
        transpose = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for skip in reversed(skips):
            self.up.append(transpose(channels, skip, 2, stride=2))
            self.merge.append(DoubleConv(2 * skip, skip, dims=dims))
            channels = skip
        self.head = conv(dims)(channels, num_classes, 1)
        if class_prior is not None:
            total = sum(class_prior)
            bias = torch.tensor([math.log(p / total) for p in class_prior])
            self.head.bias = nn.Parameter(bias - bias.mean())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits per pixel (voxel)."""
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            axes = ", ".join("HW" if self.dims == 2 else "DHW")
            raise ValueError(
                f"expected input of shape (N, {self.in_channels}, {axes}), got {tuple(x.shape)}"
            )
        if any(s % 2**self.depth for s in x.shape[2:]):
            raise ValueError(
                f"every spatial size must be divisible by {2**self.depth}, got {tuple(x.shape[2:])}"
            )
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips), strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)
