"""Layer helpers shared by the networks: 2D/3D layer choice and GroupNorm group counts."""

from __future__ import annotations

from torch import nn


def groups(channels: int) -> int:
    """GroupNorm groups: 8 when the channels allow it (Opacus accepts no BatchNorm)."""
    return 8 if channels % 8 == 0 else 1


def conv(dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    """nn.Conv2d or nn.Conv3d."""
    return nn.Conv2d if dims == 2 else nn.Conv3d


def max_pool(dims: int) -> type[nn.MaxPool2d] | type[nn.MaxPool3d]:
    """nn.MaxPool2d or nn.MaxPool3d."""
    return nn.MaxPool2d if dims == 2 else nn.MaxPool3d
