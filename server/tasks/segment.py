"""Segmentation at the aggregator: central Dice, IoU, HD95; overlays of held-out predictions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common.config import RunConfig
from common.training.loop import resolve_device
from common.training.tasks.segment import predict, segmentation_scores
from common.volumes import fullest_slices, volume_samples
from server.heldout import held_out
from server.tasks.base import DefaultSteps, Evaluator, StateDict, build
from server.tasks.figures import overlays

OVERLAYS = "segmentation.png"
SHOWN = 8


def masked_held_out(cfg: RunConfig, site_dirs: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Held-out images with a mask, and their masks (N, H, W); volumes under --dims 3."""
    if cfg.dims == 3:
        return volume_samples(held_out(cfg, site_dirs, masks=True), cfg)
    images, masks = [], []
    for data, split in held_out(cfg, site_dirs, masks=True):
        for loaded in data.iter_rows(split):
            if loaded.mask is not None:
                images.append(loaded.image.pixels)
                masks.append(loaded.mask[:, 0])
    if not images:
        return np.zeros((0,)), np.zeros((0,))
    return np.concatenate(images), np.concatenate(masks).astype(np.int64)


class SegmentCentral(DefaultSteps):
    """Dice and IoU per class and overall, HD95; `segmentation.png` at the end."""

    def evaluator(self, cfg: RunConfig, site_dirs: Sequence[Path]) -> Evaluator | None:
        """Scores of the global U-Net on the held-out images that have masks."""
        images, masks = masked_held_out(cfg, site_dirs)
        if len(images) == 0:
            return None
        device = resolve_device(cfg.device)

        def evaluate(state: StateDict) -> dict[str, float]:
            model = build(cfg)
            model.load_state_dict(state)
            scores = segmentation_scores(
                model, images, masks, cfg.num_classes, device, patch=cfg.patch()
            )
            return {**scores, "num-examples": float(len(images))}

        return evaluate

    def finish(
        self, run_dir: Path, cfg: RunConfig, state: StateDict, site_dirs: Sequence[Path]
    ) -> dict[str, float]:
        """Overlays of predicted on true masks, held-out images with a structure first."""
        images, masks = masked_held_out(cfg, site_dirs)
        if len(images) == 0:
            return {}
        model = build(cfg)
        model.load_state_dict(state)
        with_structure = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1))
        without = np.flatnonzero(~masks.reshape(len(masks), -1).any(axis=1))
        shown = np.concatenate([with_structure[: SHOWN - 2], without[:2]])[:SHOWN]
        images, masks = images[shown], masks[shown]
        predicted = predict(model, images, torch.device("cpu"), patch=cfg.patch())
        if cfg.dims == 3:  # a volume is shown by its slice with the most structure
            images, masks, predicted = fullest_slices(images, masks, predicted)
        overlays(run_dir / OVERLAYS, images, masks, predicted, "Held-out images: global U-Net")
        return {}
