"""Segmentation: a U-Net on the images that have a `mask`, MONAI's Dice + cross-entropy loss.

Rows without a mask are left out; a mask that cannot be read or whose geometry does not match
its image is reported in the site's data problems and its row skipped (common.data.SiteData).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn

from common.config import RunConfig
from common.registry import Task
from common.segmentation import overlap_metrics, surface_metrics
from common.sites import SiteRef
from common.training.augment import augmented_pairs
from common.training.loop import LossFn, TrainReport, tensor_dataset
from common.training.patches import SlidingWindow, patched
from common.training.tasks.base import (
    Fit,
    Samples,
    SplitLoader,
    batched,
    build,
    preprocess,
    site_data,
)
from common.volumes import volume_samples

# Dice's denominator guard. The numerator has none (nnU-Net's choice): a class absent from a
# sample's mask then scores a constant Dice of 0 with no gradient, so only cross-entropy teaches
# "none here", and an absent lesion's Dice does not pull every normal image towards "less
# structure everywhere" (a constant push that swamps the lesion images under DP-SGD's noise).
DICE_SMOOTH = 1e-5


def dice_ce(*, batch_dice: bool) -> DiceCELoss:
    """MONAI's Dice + cross-entropy over the foreground classes, as nnU-Net trains.

    batch_dice: Dice over the whole batch as one volume (nnU-Net's default for 2D), steadier
        for small structures; per sample otherwise, which DP-SGD needs: its per-sample
        gradients must each depend on one sample only, and batch Dice ties them together.
    """
    return DiceCELoss(
        include_background=False, to_onehot_y=True, softmax=True, smooth_nr=0.0,
        smooth_dr=DICE_SMOOTH, batch=batch_dice,
    )


def segmentation_loss(*, batch_dice: bool) -> LossFn:
    """Dice + cross-entropy of a (images, masks) batch; masks (N, *spatial) class indices."""
    criterion = dice_ce(batch_dice=batch_dice)

    def loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        images, masks = batch
        return criterion(model(images), masks.unsqueeze(1))

    return loss


def masked_samples(site: SiteRef, cfg: RunConfig, split: str) -> Samples:
    """Images (N, C, H, W) float32 and masks (N, H, W) int64 of the rows of `split` with a mask.

    Under --dims 3 one sample per volume: (N, C, D, H, W) and (N, D, H, W) (common.volumes).
    """
    data = site_data(site, preprocess(cfg), cfg.seed, masks=True)
    if cfg.dims == 3:
        return volume_samples([(data, split)], cfg)
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


# volumes scored per forward pass (a 2D batch of 64 images of 64 px holds fewer pixels than 4
# volumes of 64 voxels)
VOLUME_BATCH = 4


@torch.no_grad()
def predict(
    model: nn.Module, images: np.ndarray, device: torch.device, *, patch: int = 0
) -> np.ndarray:
    """Predicted class per pixel, (N, H, W) int64 ((N, D, H, W) for volumes).

    patch: the edge a volume model trained on; larger volumes are predicted with a sliding
        window of it (common.training.patches); 0: whole images.
    """
    model = SlidingWindow(model, patch).to(device).eval()
    chunk = 128 if images.ndim <= 4 else VOLUME_BATCH
    return batched(lambda x: model(x).argmax(dim=1), images, device, chunk).astype(np.int64)


def segmentation_scores(
    model: nn.Module, images: np.ndarray, masks: np.ndarray, num_classes: int,
    device: torch.device, *, patch: int = 0,
) -> dict[str, float]:
    """Loss, pooled Dice and IoU (overall and per class), mean HD95 (pixels) and NSD.

    patch: as `predict`'s; the loss is then the sliding window's too.
    """
    windowed = SlidingWindow(model, patch).to(device).eval()
    losses = []
    loss_fn = segmentation_loss(batch_dice=False)
    chunk = 64 if images.ndim <= 4 else VOLUME_BATCH
    with torch.no_grad():
        for i in range(0, len(images), chunk):
            x = torch.as_tensor(images[i : i + chunk], dtype=torch.float32).to(device)
            y = torch.as_tensor(masks[i : i + chunk]).to(device)
            losses.append(float(loss_fn(windowed, [x, y])) * len(x))
    predicted = predict(model, images, device, patch=patch)
    scores = overlap_metrics(predicted, masks, num_classes)
    scores.update(surface_metrics(predicted, masks, num_classes))
    scores["loss"] = sum(losses) / len(images) if len(images) else float("nan")
    return scores


class SegmentTask:
    """`--task segment`: a U-Net on the `mask` column."""

    name = Task.segment.value
    metrics = frozenset({"dice", "iou", "hd95", "nsd", "loss"})

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
        loss = segmentation_loss(batch_dice=fit_.privacy is None)
        generator = torch.Generator().manual_seed(fit_.seed)
        if cfg.augment:
            loss = augmented_pairs(loss, generator)
        if cfg.dims == 3:  # crop first, then augment the patch
            loss = patched(loss, cfg.patch(), generator)
        return fit_.run(model, dataset, loss)

    def evaluate(
        self, model: nn.Module, samples: Samples, cfg: RunConfig, device: torch.device
    ) -> dict[str, float]:
        """Loss, Dice, IoU, HD95 and NSD (the per-class scores stay local)."""
        images, masks = samples
        scores = segmentation_scores(
            model, images, masks, cfg.num_classes, device, patch=cfg.patch()
        )
        return {k: v for k, v in scores.items() if k in self.metrics}
