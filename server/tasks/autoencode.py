"""Autoencoding at the aggregator: reconstruction error, anomaly AUROC, a reconstruction grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common.config import RunConfig
from common.registry import ANOMALY_AUROC
from common.training.loop import resolve_device
from common.training.tasks.autoencode import (
    anomaly_auroc,
    anomaly_map,
    anomaly_scores,
    reconstruction_error,
)
from server.heldout import held_out
from server.tasks.base import DefaultSteps, Evaluator, StateDict, build
from server.tasks.figures import image_grid

GRID = "reconstructions.png"
SHOWN = 8


def images_and_labels(cfg: RunConfig, site_dirs: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Every held-out image and its label (-1: unlabelled)."""
    parts = [data.split(split) for data, split in held_out(cfg, site_dirs)]
    if not parts:
        return np.zeros((0,)), np.zeros((0,), np.int64)
    return np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts])


class AutoencodeCentral(DefaultSteps):
    """`loss` (mean squared error) and `anomaly_auroc`; `reconstructions.png` at the end."""

    def evaluator(self, cfg: RunConfig, site_dirs: Sequence[Path]) -> Evaluator | None:
        """Reconstruction error and the anomaly score's AUROC (lesion against normal)."""
        images, labels = images_and_labels(cfg, site_dirs)
        if len(images) == 0:
            return None
        device = resolve_device(cfg.device)

        def evaluate(state: StateDict) -> dict[str, float]:
            model = build(cfg)
            model.load_state_dict(state)
            return {
                "loss": reconstruction_error(model, images, device),
                ANOMALY_AUROC: anomaly_auroc(anomaly_scores(model, images, device), labels),
                "num-examples": float(len(images)),
            }

        return evaluate

    def finish(
        self, run_dir: Path, cfg: RunConfig, state: StateDict, site_dirs: Sequence[Path]
    ) -> dict[str, float]:
        """Originals, reconstructions and anomaly maps of held-out images (lesions first)."""
        images, labels = images_and_labels(cfg, site_dirs)
        if len(images) == 0:
            return {}
        order = np.argsort(labels < 1, kind="stable")[:SHOWN]
        model = build(cfg)
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            x = torch.as_tensor(images[order], dtype=torch.float32)
            recon = model(x)
            spots = anomaly_map(x, recon).clamp(min=0).numpy()
        spots = spots / max(float(spots.max()), 1e-8)
        image_grid(
            run_dir / GRID, [images[order], recon.numpy(), spots],
            ["held-out", "reconstruction", "anomaly map (bright-spot response, scaled)"],
            "Global autoencoder on held-out images",
        )
        return {}
