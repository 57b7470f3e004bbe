"""Central evaluation of the global model on held-out images the aggregator may read.

In simulation that is the `--test-data` folder, or else every site's `test` split. A deployed
aggregator holds no patient images; without `test-data` it relies on federated evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from client.train import evaluate, resolve_device
from common.config import RunConfig
from common.data import Preprocess, SiteData
from models import build_model

log = logging.getLogger("medfed.server")


class CentralEvaluator:
    """Evaluate global arrays on a fixed labelled test set."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, cfg: RunConfig) -> None:
        if len(labels) == 0:
            raise ValueError("the central test set holds no labelled images")
        self.images, self.labels, self.cfg = images, labels, cfg
        self.device = resolve_device(cfg.device)

    @classmethod
    def from_config(
        cls, cfg: RunConfig, site_dirs: Sequence[Path] = ()
    ) -> CentralEvaluator | None:
        """Test images from `cfg.test_data` (all of them), else the sites' test splits."""
        pre = Preprocess(image_size=cfg.image_size, channels=cfg.channels)
        if cfg.test_data:
            folder = Path(cfg.test_data)
            if not (folder / "labels.csv").is_file():
                raise FileNotFoundError(
                    f"--test-data {folder}: no labels.csv there; pass a folder in the site "
                    "layout (e.g. the `test/` folder that `medfed synth` writes)"
                )
            parts = [SiteData(folder, pre, seed=cfg.seed).split("all")]
        elif site_dirs:
            # virtual sites cut out of one pool all name the pool: read its test split once
            unique = dict.fromkeys(Path(d).resolve() for d in site_dirs)
            parts = [SiteData(d, pre, seed=cfg.seed).split("test") for d in unique]
        else:
            log.warning("no --test-data: central evaluation is off, federated evaluation only")
            return None
        images = np.concatenate([p.images for p in parts])
        labels = np.concatenate([p.labels for p in parts])
        keep = labels >= 0
        if not keep.any():
            log.warning("held-out data holds no labelled image: central evaluation is off")
            return None
        return cls(images[keep], labels[keep], cfg)

    def __call__(self, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics of the model with these weights on the test set."""
        model = build_model(
            self.cfg.model,
            in_channels=self.cfg.channels,
            num_classes=self.cfg.num_classes,
            image_size=self.cfg.image_size,
        )
        model.load_state_dict(state_dict)
        metrics = evaluate(model, self.images, self.labels, device=self.device)
        metrics["num-examples"] = float(len(self.labels))
        return metrics
