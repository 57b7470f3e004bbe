"""The generator of the class-conditional DCGAN: noise and a class -> an image in [0, 1]."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

START = 4  # the generator's first feature map is START x START


def check_gan_size(image_size: int) -> int:
    """Up-sampling steps from START to `image_size`; raises unless it is START * 2**n, n >= 2."""
    steps = 0
    size = START
    while size < image_size:
        size *= 2
        steps += 1
    if size != image_size or steps < 2:
        raise ValueError(
            f"image_size must be 16, 32, 64, 128 or another power of two >= 16 for the GAN, "
            f"got {image_size}; choose e.g. 64"
        )
    return steps


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d without the integer `num_batches_tracked` buffer (unused at a fixed momentum).

    The generator never sees a real image and DP-SGD never wraps it, so it may normalise over
    the batch as DCGAN's generator does (part of what stopped its mode collapse: README,
    Tasks). Its state is float arrays only, which every aggregation strategy averages like
    weights; sampling in eval mode uses the running statistics.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.register_buffer("num_batches_tracked", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # BatchNorm's own loader adds `num_batches_tracked` to a state without version
        # metadata (a plain dict, as every federated round delivers it), which strict loading
        # then rejects: load as any module does
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)


class UpBlock(nn.Module):
    """Nearest up-sampling by 2 (no checkerboard artefacts), convolution, BatchNorm, ReLU.

    The class shifts each channel after the normalisation (a class-conditional bias), so the
    class reaches every resolution, not only the first feature map.
    """

    def __init__(self, in_channels: int, out_channels: int, conditions: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = BatchNorm(out_channels)
        self.shift = nn.Linear(conditions, out_channels, bias=False)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Twice the size; `condition` (N, conditions) is the one-hot class."""
        x = self.norm(self.conv(self.up(x)))
        return F.relu(x + self.shift(condition)[:, :, None, None])


class ConditionalGenerator(nn.Module):
    """DCGAN generator conditioned on a class by a one-hot vector next to the noise.

    Class `num_classes` means "no class" (the GAN's unconditional mode, learnt from
    unlabelled images).

    Args:
        latent_dim: size of the noise vector.
        width: channels of the last up-sampling block; each earlier block doubles it.

    """

    def __init__(
        self,
        *,
        out_channels: int = 1,
        num_classes: int = 2,
        image_size: int = 64,
        latent_dim: int = 64,
        width: int = 8,
    ) -> None:
        super().__init__()
        if out_channels not in (1, 3):
            raise ValueError(f"out_channels must be 1 or 3, got {out_channels}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        steps = check_gan_size(image_size)
        self.latent_dim, self.num_classes = latent_dim, num_classes
        channels = width * 2**steps
        self.project = nn.Sequential(
            nn.Linear(latent_dim + num_classes + 1, channels * START * START),
            nn.ReLU(),
        )
        self.start_channels = channels
        blocks: list[UpBlock] = []
        for _ in range(steps):
            blocks.append(UpBlock(channels, channels // 2, num_classes + 1))
            channels //= 2
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.Conv2d(channels, out_channels, 3, padding=1), nn.Sigmoid())

    def forward(self, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Images (N, out_channels, S, S) for noise (N, latent_dim) and classes (N,)."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"expected noise of shape (N, {self.latent_dim}), got {tuple(z.shape)}"
            )
        if classes.shape != (len(z),):
            raise ValueError(f"expected {len(z)} classes, got shape {tuple(classes.shape)}")
        onehot = F.one_hot(classes.long(), self.num_classes + 1).to(z.dtype)
        x = self.project(torch.cat([z, onehot], dim=1))
        x = x.view(len(z), self.start_channels, START, START)
        for block in self.blocks:
            x = block(x, onehot)
        return self.head(x)

    def sample(
        self, classes: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images of the given classes from fresh noise."""
        z = torch.randn(
            len(classes), self.latent_dim, generator=generator, device=classes.device
        )
        return self(z, classes)
