"""The class-conditional GAN as one module, so both networks travel in one ArrayRecord.

Its state dict holds `generator.*` and `discriminator.*`: Flower's strategies average each
array by name, so both networks are federated without the strategy knowing there are two.
"""

from __future__ import annotations

import torch
from torch import nn

from models.cgan_discriminator import ConditionalDiscriminator
from models.cgan_generator import ConditionalGenerator


class ConditionalGAN(nn.Module):
    """A generator and a discriminator for `num_classes` classes (plus "no class").

    Args:
        width: the networks' width (the discriminator's first block, the generator's last).
            32 by default: at 8 the generator, with the rest of the recipe that stopped its
            mode collapse, still drew no nodule a classifier could learn from (README, Tasks).

    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 2,
        image_size: int = 64,
        latent_dim: int = 64,
        width: int = 32,
    ) -> None:
        super().__init__()
        self.generator = ConditionalGenerator(
            out_channels=in_channels, num_classes=num_classes, image_size=image_size,
            latent_dim=latent_dim, width=width,
        )
        self.discriminator = ConditionalDiscriminator(
            in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width,
        )

    def forward(self, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The discriminator's logits on generated images (what the generator step trains)."""
        return self.discriminator(self.generator(z, classes), classes)
