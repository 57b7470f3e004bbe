"""Central evaluation of the global model on held-out images the aggregator may read.

The test set is `server.heldout.held_out`: `--test-data`, else the sites' test splits. A binary
classifier is scored at the run's operating point (server.operating: chosen on the sites'
validation histograms, never on this test set), and calibrated on it (ECE, Brier score).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common.config import RunConfig
from common.operating import DEFAULT_THRESHOLD
from common.training.loop import evaluate, resolve_device
from models import build_model
from server.heldout import held_out

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
        sources = held_out(cfg, site_dirs)
        if not sources:
            return None
        parts = [data.split(split) for data, split in sources]
        for (data, _), part in zip(sources, parts, strict=True):
            if len(part.labels) and part.labels.max() >= cfg.num_classes:
                raise ValueError(
                    f"{data.site_dir / 'labels.csv'}: label {int(part.labels.max())} in the "
                    f"central test set, but --num-classes is {cfg.num_classes} (labels 0.."
                    f"{cfg.num_classes - 1}); fix the label or pass a larger --num-classes"
                )
        images = np.concatenate([p.images for p in parts])
        labels = np.concatenate([p.labels for p in parts])
        keep = labels >= 0
        if not keep.any():
            log.warning("held-out data holds no labelled image: central evaluation is off")
            return None
        return cls(images[keep], labels[keep], cfg)

    def __call__(
        self, state_dict: dict[str, torch.Tensor], *, threshold: float | None = None
    ) -> dict[str, float]:
        """Metrics of the model with these weights on the test set.

        Args:
            threshold: a binary classifier's operating point on P(positive) (None: 0.5);
                recorded as `threshold` beside the metrics. Other tasks have none.

        """
        model = build_model(self.cfg.model, **self.cfg.network_args())
        model.load_state_dict(state_dict)
        metrics = evaluate(model, self.images, self.labels, device=self.device,
                           threshold=threshold)
        if self.cfg.num_classes == 2:
            metrics["threshold"] = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        metrics["num-examples"] = float(len(self.labels))
        return metrics
