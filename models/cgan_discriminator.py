"""The discriminator of the class-conditional DCGAN: (image, class) -> real/fake logit.

The only network of the GAN that sees real images, so the one trained with DP-SGD: GroupNorm
(Opacus accepts no BatchNorm) and only layers that Opacus computes per-sample gradients for.

Conditioning is by projection (Miyato and Koyama, 2018): the realness logit is an unconditional
term plus the inner product of the image's features with an embedding of its class, so the
class cannot be ignored. An auxiliary head (AC-GAN, Odena et al., 2017) also predicts the class
from the image alone: trained on real images, it tells the generator what a class looks like (a
lesion for class 1), a much stronger signal than real-against-fake alone. The image's features
never see the class, or that head could read the answer off its input.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from models.cgan_generator import START, check_gan_size
from models.layers import groups


class DownBlock(nn.Sequential):
    """Strided 4x4 convolution halving the size, GroupNorm, LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1),
            nn.GroupNorm(groups(out_channels), out_channels),
            nn.LeakyReLU(0.2),
        )


class ConditionalDiscriminator(nn.Module):
    """Projection discriminator with a class head; class `num_classes` is "no class".

    "No class" (unlabelled images, and generated ones drawn without a class) gets the
    unconditional term only, which every real image trains.

    Args:
        width: channels of the first block; each further block doubles it.

    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 2,
        image_size: int = 64,
        width: int = 8,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        steps = check_gan_size(image_size)
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        blocks: list[nn.Module] = []
        channels = in_channels
        for i in range(steps):
            out = width * 2**i
            blocks.append(DownBlock(channels, out))
            channels = out
        self.blocks = nn.Sequential(*blocks)
        features = channels * START * START
        self.features = nn.Sequential(nn.Flatten(), nn.Dropout(dropout))
        self.head = nn.Linear(features, 1)
        # a class's embedding, as a bias-free linear map of its one-hot vector ("no class": 0)
        self.embed = nn.Linear(num_classes, features, bias=False)
        self.classifier = nn.Linear(features, num_classes)

    def forward(
        self, x: torch.Tensor, classes: torch.Tensor, *, class_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Realness logits (N,) of images (N, C, S, S) of the given classes (N,).

        With `class_logits`, also the class head's logits (N, num_classes), from the image alone.
        """
        size = self.image_size
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, size, size):
            raise ValueError(
                f"expected images of shape (N, {self.in_channels}, {size}, {size}), "
                f"got {tuple(x.shape)}"
            )
        if classes.shape != (len(x),):
            raise ValueError(f"expected {len(x)} classes, got shape {tuple(classes.shape)}")
        h = self.features(self.blocks(x))
        onehot = F.one_hot(classes.long(), self.num_classes + 1)[:, : self.num_classes]
        realness = self.head(h).squeeze(1) + (self.embed(onehot.to(h.dtype)) * h).sum(dim=1)
        if class_logits:
            return realness, self.classifier(h)
        return realness
