"""A compact CNN classifier that Opacus accepts: GroupNorm instead of BatchNorm."""

from __future__ import annotations

import torch
from torch import nn

from models.layers import double_conv


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions with GroupNorm and ReLU, then 2x2 max pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(*double_conv(in_channels, out_channels), nn.MaxPool2d(2))


class GlobalMaxAvgPool(nn.Module):
    """Concatenate global max and global average pooling: (N, C, H, W) -> (N, 2C).

    Max pooling keeps a small lesion's response, which averaging over the whole image dilutes
    (a 3-pixel lesion is 1/64 of an 8x8 feature map); the average keeps diffuse findings.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool each channel over all positions."""
        return torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)


class CNNClassifier(nn.Module):
    """Image classifier for `in_channels` x `image_size` x `image_size` inputs.

    Args:
        width: channels of the first block; each further block doubles it.
        depth: number of down-sampling blocks; `image_size` must be divisible by 2**depth.

    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 2,
        image_size: int = 64,
        width: int = 8,
        depth: int = 3,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if depth < 1 or image_size % (2**depth) != 0 or image_size < 2**depth:
            raise ValueError(
                f"image_size must be a positive multiple of {2**depth} for a {depth}-block CNN, "
                f"got {image_size}; choose e.g. {max(2**depth, 64)}"
            )
        self.image_size = image_size
        self.in_channels = in_channels
        blocks: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            out = width * 2**i
            blocks.append(ConvBlock(channels, out))
            channels = out
        self.features = nn.Sequential(*blocks)
        self.pool = GlobalMaxAvgPool()
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape (N, num_classes)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return self.head(self.pool(self.features(x)))
