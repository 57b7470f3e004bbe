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


def double_conv(in_channels: int, out_channels: int, *, dims: int = 2) -> list[nn.Module]:
    """Two 3x3(x3) convolutions, each followed by GroupNorm and ReLU: the layers of every block.

    Returned as a list so each network's block lays them out flat in its own `nn.Sequential`,
    which keeps the state-dict keys (`0.weight` ... `4.bias`) that saved models and the encoder
    transfer (models.autoencoder -> models.cnn) rely on.
    """
    return [
        conv(dims)(in_channels, out_channels, 3, padding=1),
        nn.GroupNorm(groups(out_channels), out_channels),
        nn.ReLU(),
        conv(dims)(out_channels, out_channels, 3, padding=1),
        nn.GroupNorm(groups(out_channels), out_channels),
        nn.ReLU(),
    ]


def check_encoder_args(
    *, dims: int, in_channels: int, image_size: int, depth: int, net: str
) -> None:
    """The checks every down-sampling network shares; `net` names it in the message."""
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 (images) or 3 (volumes), got {dims}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if depth < 1 or image_size % (2**depth) != 0:
        raise ValueError(
            f"image_size must be a positive multiple of {2**depth} for a depth-{depth} "
            f"{net}, got {image_size}; choose e.g. {max(2**depth, 64)}"
        )
