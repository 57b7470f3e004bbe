"""Training on random patches of volumes, and predicting whole volumes with a sliding window.

Training (nnU-Net's sampler): each sample of a batch gets its own patch. With probability
FOREGROUND_RATE the patch is centred on a random voxel of a random foreground class the sample's
mask holds (so small structures are seen often enough to learn); otherwise its corner is uniform
over the volume. A patch near the edge is moved inside the volume, never padded.

DP-SGD needs each sample's loss to depend on that sample alone. The random numbers are drawn
as a fixed (N, DRAWS) block per batch, before any mask is looked at: sample i's patch is a
function of row i and of its own mask only, so another sample's mask can neither move it nor
change how many numbers the generator hands out (tests/training/test_patches.py). The randomness
is data-independent, so the privacy accounting is unchanged.

Inference: a network trained on patches has only seen patch-sized inputs (GroupNorm's statistics
are the patch's), so a larger volume is predicted with MONAI's sliding window: patches
overlapping by half, blended with Gaussian weights that trust each window's centre most.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn

LossFn = Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor]

# nnU-Net's oversample_foreground_percent: a third of the patches hold a structure for certain
FOREGROUND_RATE = 1 / 3
# per sample: oversample or not, which class, which voxel, then one corner per spatial axis
DRAWS = 6
# sliding-window inference: overlap of neighbouring windows, and windows per forward pass
OVERLAP = 0.5
WINDOWS_PER_PASS = 4


def patch_draws(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, DRAWS) uniform numbers in [0, 1): all the randomness of `n` samples' patches."""
    return torch.rand(n, DRAWS, generator=generator)


def patch_start(
    mask: torch.Tensor, size: int, draws: torch.Tensor, *, foreground_rate: float
) -> tuple[int, ...]:
    """The patch's first voxel on each axis of `mask` (*spatial), from one row of draws."""
    shape = mask.shape
    centre: list[int] | None = None
    if float(draws[0]) < foreground_rate:
        classes = torch.unique(mask[mask > 0])
        if len(classes):
            chosen = classes[min(int(float(draws[1]) * len(classes)), len(classes) - 1)]
            voxels = torch.nonzero(mask == chosen)
            voxel = voxels[min(int(float(draws[2]) * len(voxels)), len(voxels) - 1)]
            centre = [int(v) for v in voxel]
    starts = []
    for axis, extent in enumerate(shape):
        room = extent - size
        if centre is None:
            start = min(int(float(draws[3 + axis]) * (room + 1)), room)
        else:
            start = min(max(centre[axis] - size // 2, 0), room)
        starts.append(start)
    return tuple(starts)


def crop_patches(
    images: torch.Tensor, masks: torch.Tensor, size: int, draws: torch.Tensor, *,
    foreground_rate: float = FOREGROUND_RATE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's own patch: images (N, C, *spatial) -> (N, C, size, ...), masks alike.

    draws: (N, DRAWS) from `patch_draws`; row i decides sample i's patch.
    """
    if len(draws) != len(images) or draws.shape[1] != DRAWS:
        raise ValueError(f"draws must be ({len(images)}, {DRAWS}), got {tuple(draws.shape)}")
    if any(size > extent for extent in masks.shape[1:]):
        raise ValueError(f"patch of {size} voxels does not fit volumes of {tuple(masks.shape[1:])}")
    image_patches, mask_patches = [], []
    for image, mask, row in zip(images, masks, draws, strict=True):
        starts = patch_start(mask, size, row, foreground_rate=foreground_rate)
        window = tuple(slice(s, s + size) for s in starts)
        image_patches.append(image[(slice(None), *window)])
        mask_patches.append(mask[window])
    return torch.stack(image_patches), torch.stack(mask_patches)


def patched(
    loss_fn: LossFn, size: int, generator: torch.Generator, *,
    foreground_rate: float = FOREGROUND_RATE,
) -> LossFn:
    """`loss_fn` on a random patch of each (image, mask) pair while the model trains.

    Volumes no larger than the patch train whole; evaluation always sees whole volumes.
    """

    def loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        images, masks = batch
        if model.training and any(extent > size for extent in masks.shape[1:]):
            # the draws stay on the CPU: each is read once, as a Python number
            draws = patch_draws(len(images), generator)
            images, masks = crop_patches(
                images, masks, size, draws, foreground_rate=foreground_rate
            )
        return loss_fn(model, [images, masks])

    return loss


def window_logits(model: nn.Module, images: torch.Tensor, patch: int) -> torch.Tensor:
    """Class logits of whole volumes (N, C, *spatial) from `patch`-sized windows of them.

    MONAI's sliding window, half-overlapping and Gaussian-blended; a volume that fits in one
    window is still run through it (one window, weight 1 everywhere).
    """
    dims = images.dim() - 2
    logits = sliding_window_inference(
        images, roi_size=(patch,) * dims, sw_batch_size=WINDOWS_PER_PASS, predictor=model,
        overlap=OVERLAP, mode="gaussian",
    )
    if not isinstance(logits, torch.Tensor):  # MONAI returns a tuple only for tuple predictors
        raise TypeError(f"sliding window returned {type(logits).__name__}, expected a tensor")
    return logits


class SlidingWindow(nn.Module):
    """`model` applied to whole volumes: directly where they fit in `patch`, else window by window.

    patch: the edge the model trained on (0: every input goes to the model whole).
    """

    def __init__(self, model: nn.Module, patch: int) -> None:
        super().__init__()
        self.model, self.patch = model, patch

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits per voxel, (N, classes, *spatial)."""
        if self.patch <= 0 or all(extent <= self.patch for extent in images.shape[2:]):
            return self.model(images)
        return window_logits(self.model, images, self.patch)
