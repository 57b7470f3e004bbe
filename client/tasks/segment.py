"""Segmentation: a U-Net on the images that have a `mask`, Dice + cross-entropy loss.

Rows without a mask are left out; a mask that cannot be read or whose geometry does not match
its image is reported in the site's data problems and its row skipped (common.data.SiteData).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from client.tasks.base import Fit, Samples, SplitLoader, batched, build, preprocess, site_data
from client.train import TrainReport, tensor_dataset
from common.config import RunConfig
from common.segmentation import mean_hausdorff95, overlap_metrics
from common.sites import SiteRef

# Dice's smoothing term: keeps the Dice of a lesion of a few pixels from swinging between 0 and 1.
SMOOTH = 1.0
# Cross-entropy weight of each structure class against background: a lesion is well under 1% of
# the pixels, and unweighted cross-entropy is nearly minimised by predicting none.
STRUCTURE_WEIGHT = 10.0


def soft_dice_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice over the foreground classes a sample holds, per sample, then the batch mean.

    Per sample, so that Opacus's per-sample gradients are each sample's own. A class absent
    from a sample's mask adds nothing to its Dice term (a sample without any structure: 0);
    the cross-entropy alone teaches "none here". Counted, an absent class's Dice loss is
    1 - 1 / (sum of its probabilities + 1), 0.9 at the structure prior of 1% on a 32 x 32
    image, and its gradient, the same direction ("less structure everywhere") on every normal
    image, swamps the lesion images' under DP-SGD's noise (central Dice 0.00 at epsilon 8 with
    it, README "Tasks").
    """
    num_classes = logits.shape[1]
    probs = torch.softmax(logits, dim=1)[:, 1:]
    target = F.one_hot(masks, num_classes).movedim(-1, 1)[:, 1:].to(probs.dtype)
    axes = tuple(range(2, probs.dim()))
    inter = (probs * target).sum(axes)
    present = target.sum(axes)
    total = probs.sum(axes) + present
    dice_loss = 1 - (2 * inter + SMOOTH) / (total + SMOOTH)
    held = (present > 0).to(probs.dtype)
    # mean over the classes the sample holds; 0 for a sample that holds none
    per_sample = (dice_loss * held).sum(dim=1) / held.sum(dim=1).clamp(min=1)
    return per_sample.mean()


def segmentation_loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Class-weighted cross-entropy plus soft Dice, each per sample, then the batch mean.

    The weighted cross-entropy is divided by the pixel count, not by the batch's total weight
    (PyTorch's `weight=` mean): that would tie each sample's gradient to the rest of its batch,
    which DP-SGD's per-sample clipping must not see.
    """
    images, masks = batch
    logits = model(images)
    per_pixel = F.cross_entropy(logits, masks, reduction="none")
    weighted = torch.where(masks > 0, STRUCTURE_WEIGHT * per_pixel, per_pixel)
    return weighted.mean() + soft_dice_loss(logits, masks)


def masked_samples(site: SiteRef, cfg: RunConfig, split: str) -> Samples:
    """Images (N, C, H, W) float32 and masks (N, H, W) int64 of the rows of `split` with a mask."""
    data = site_data(site, preprocess(cfg), cfg.seed, masks=True)
    images, masks = [], []
    for loaded in data.iter_rows(split):
        if loaded.mask is None:
            continue
        images.append(loaded.image.pixels)
        masks.append(loaded.mask[:, 0])
    size = cfg.image_size
    if not images:
        return (
            np.zeros((0, cfg.channels, size, size), np.float32), np.zeros((0, size, size), np.int64)
        )
    mask_array = np.concatenate(masks).astype(np.int64)
    if int(mask_array.max()) >= cfg.num_classes:
        raise ValueError(
            f"site {site.name}: mask label {int(mask_array.max())} found but the run has "
            f"--num-classes {cfg.num_classes} (background included); pass --num-classes "
            f"{int(mask_array.max()) + 1}"
        )
    return np.concatenate(images), mask_array


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, device: torch.device) -> np.ndarray:
    """Predicted class per pixel, (N, H, W) int64."""
    model.to(device).eval()
    return batched(lambda x: model(x).argmax(dim=1), images, device).astype(np.int64)


def segmentation_scores(
    model: nn.Module, images: np.ndarray, masks: np.ndarray, num_classes: int,
    device: torch.device,
) -> dict[str, float]:
    """Loss, pooled Dice and IoU (overall and per class) and mean HD95 in pixels."""
    model.to(device).eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(images), 64):
            x = torch.as_tensor(images[i : i + 64], dtype=torch.float32).to(device)
            y = torch.as_tensor(masks[i : i + 64]).to(device)
            losses.append(float(segmentation_loss(model, [x, y])) * len(x))
    predicted = predict(model, images, device)
    scores = overlap_metrics(predicted, masks, num_classes)
    scores["hd95"] = mean_hausdorff95(predicted, masks, num_classes)
    scores["loss"] = sum(losses) / len(images) if len(images) else float("nan")
    return scores


class SegmentTask:
    """`--task segment`: a U-Net on the `mask` column."""

    name = "segment"
    metrics = frozenset({"dice", "iou", "hd95", "loss"})

    def load(self, site: SiteRef, cfg: RunConfig, split: str, labelled: SplitLoader) -> Samples:
        """Images and masks of the rows of `split` that have a readable, aligned mask."""
        return masked_samples(site, cfg, split)

    def releases(self, cfg: RunConfig) -> dict[str, float]:
        """None: DP-SGD's steps are all this task spends."""
        return {}

    def build(self, cfg: RunConfig) -> nn.Module:
        """The U-Net."""
        return build(cfg)

    def train(self, model: nn.Module, samples: Samples, cfg: RunConfig, fit_: Fit) -> TrainReport:
        """Dice + cross-entropy training, DP-SGD when `fit_.privacy` is set."""
        dataset = tensor_dataset(*samples, dtypes=(torch.float32, torch.long))
        return fit_.run(model, dataset, segmentation_loss)

    def evaluate(
        self, model: nn.Module, samples: Samples, cfg: RunConfig, device: torch.device
    ) -> dict[str, float]:
        """Loss, Dice, IoU and HD95 (the per-class scores stay local)."""
        images, masks = samples
        scores = segmentation_scores(model, images, masks, cfg.num_classes, device)
        return {k: v for k, v in scores.items() if k in self.metrics}
