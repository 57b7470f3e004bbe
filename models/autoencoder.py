"""A convolutional autoencoder, 2D or 3D, whose encoder has the CNN classifier's layout.

Its encoder is `models.cnn.CNNClassifier.features` layer for layer (same blocks, same widths,
same parameter names under `encoder.` instead of `features.`), so a federated autoencoder
can initialise a classifier: unsupervised pretraining, then supervised fine-tuning.

Reconstruction alone teaches the encoder the common anatomy and, through the narrow code, to
leave rare structures out: exactly what a lesion classifier needs least. So the encoder also
feeds a spot head, a 1x1 convolution giving one map at the code's resolution, which the
autoencoding task trains, with --spot-weight, to predict where the reconstruction misses a
bright spot (a target computed from the image and its own reconstruction, no label;
`common.training.tasks.autoencode`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from models.layers import check_encoder_args, conv, double_conv, groups, max_pool

ENCODER_PREFIX = "encoder."
CLASSIFIER_FEATURES_PREFIX = "features."


class EncoderBlock(nn.Sequential):
    """models.cnn.ConvBlock in 2D or 3D: two convolutions with GroupNorm and ReLU, then pooling."""

    def __init__(self, in_channels: int, out_channels: int, *, dims: int) -> None:
        super().__init__(*double_conv(in_channels, out_channels, dims=dims), max_pool(dims)(2))


class DecoderBlock(nn.Sequential):
    """Nearest-neighbour up-sampling by 2, then a convolution with GroupNorm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, dims: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="nearest"),
            conv(dims)(in_channels, out_channels, 3, padding=1),
            nn.GroupNorm(groups(out_channels), out_channels),
            nn.ReLU(),
        )


class ConvAutoencoder(nn.Module):
    """Reconstructs (N, C, *spatial) images in [0, 1] through a narrow code.

    Args:
        width, depth: as the CNN classifier's (its encoder must match to initialise one).
        latent_channels: channels of the code at 1/2**depth resolution; the narrower, the
            worse rare structures (lesions) are reconstructed, which is what makes the
            reconstruction error an anomaly score.
        dims: 2 for images and slices, 3 for volumes.

    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 64,
        width: int = 8,
        depth: int = 3,
        latent_channels: int = 4,
        dims: int = 2,
    ) -> None:
        super().__init__()
        check_encoder_args(
            dims=dims, in_channels=in_channels, image_size=image_size, depth=depth,
            net="autoencoder",
        )
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
        self.dims, self.depth, self.in_channels = dims, depth, in_channels
        blocks: list[nn.Module] = []
        channels = in_channels
        for level in range(depth):
            out = width * 2**level
            blocks.append(EncoderBlock(channels, out, dims=dims))
            channels = out
        self.encoder = nn.Sequential(*blocks)
        self.to_code = conv(dims)(channels, latent_channels, 1)
        self.from_code = nn.Sequential(
            conv(dims)(latent_channels, channels, 1),
            nn.GroupNorm(groups(channels), channels),
            nn.ReLU(),
        )
        up: list[nn.Module] = []
        for level in reversed(range(depth)):
            out = width * 2 ** max(level - 1, 0)
            up.append(DecoderBlock(channels, out, dims=dims))
            channels = out
        self.decoder = nn.Sequential(*up)
        self.head = nn.Sequential(conv(dims)(channels, in_channels, 3, padding=1), nn.Sigmoid())
        self.spot_head = conv(dims)(width * 2 ** (depth - 1), 1, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code: (N, latent_channels, *spatial / 2**depth)."""
        self._check(x)
        return self.to_code(self.encoder(x))

    def forward(
        self, x: torch.Tensor, *, spots: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The reconstruction, same shape as `x`, values in [0, 1].

        With `spots`, also the spot head's map (N, 1, *spatial / 2**depth), from the same pass.
        """
        self._check(x)
        features = self.encoder(x)
        reconstruction = self.head(self.decoder(self.from_code(self.to_code(features))))
        return (reconstruction, self.spot_head(features)) if spots else reconstruction

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            axes = "HW" if self.dims == 2 else "DHW"
            raise ValueError(
                f"expected input of shape (N, {self.in_channels}, {', '.join(axes)}), "
                f"got {tuple(x.shape)}"
            )
        if any(s % 2**self.depth for s in x.shape[2:]):
            raise ValueError(
                f"every spatial size must be divisible by {2**self.depth}, got {tuple(x.shape[2:])}"
            )


def classifier_init(
    autoencoder_state: Mapping[str, torch.Tensor], classifier_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The classifier's state with its feature blocks replaced by the autoencoder's encoder.

    Raises ValueError naming the first parameter that does not fit (another width, depth,
    channel count or image size).
    """
    merged = dict(classifier_state)
    copied = 0
    for key, value in autoencoder_state.items():
        if not key.startswith(ENCODER_PREFIX):
            continue
        target = CLASSIFIER_FEATURES_PREFIX + key[len(ENCODER_PREFIX):]
        if target not in merged or merged[target].shape != value.shape:
            have = tuple(merged[target].shape) if target in merged else "missing"
            raise ValueError(
                f"the autoencoder's {key} {tuple(value.shape)} does not fit the classifier's "
                f"{target} ({have}); pretrain with the classifier's --image-size and channels"
            )
        merged[target] = value.clone()
        copied += 1
    if copied == 0:
        raise ValueError(
            "the model holds no encoder: pass the run folder of a --task autoencode run"
        )
    return merged
