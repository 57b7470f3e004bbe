"""The centralised baseline: the same network trained on every site's images pooled in one place.

This is what a federation is measured against (federated AUC / central AUC). It is only possible
in simulation, where one machine may read every virtual site's folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import RunConfig
from common.data import Preprocess, SiteData
from common.outputs import write_json
from common.sites import discover_sites
from common.training.loop import LocalTraining, evaluate, resolve_device, train_local
from models import build_model
from server.central import CentralEvaluator


def pooled_training_data(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """Every site's labelled training images, concatenated."""
    pre = Preprocess(image_size=cfg.image_size, channels=cfg.channels)
    sites = discover_sites(Path(cfg.sites_dir))
    parts = [SiteData(d, pre, seed=cfg.seed).split("train") for d in sites]
    images = np.concatenate([p.images for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    keep = labels >= 0
    return images[keep], labels[keep]


def train_central(cfg: RunConfig, *, epochs: int) -> dict[str, Any]:
    """Train on the pooled data for `epochs` (no DP) and evaluate like `simulate` does.

    The test set is the same as the federation's: `cfg.test_data`, else the sites' test splits.
    Writes `cfg.out/central.json` with the test metrics after every epoch.
    """
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    images, labels = pooled_training_data(cfg)
    evaluator = CentralEvaluator.from_config(cfg, discover_sites(Path(cfg.sites_dir)))
    if evaluator is None:
        raise ValueError("no labelled held-out images: pass --test-data")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, **cfg.network_args())
    settings = LocalTraining(
        epochs=1, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
        momentum=cfg.momentum,
    )
    history = []
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        report = train_local(
            model, images, labels, settings=settings, device=device, seed=cfg.seed + epoch
        )
        metrics = evaluate(model, evaluator.images, evaluator.labels, device=device)
        history.append({"epoch": epoch, "train_loss": report.loss, **metrics})
    result = {
        "config": cfg.to_mapping(),
        "train_images": int(len(labels)),
        "test_images": int(len(evaluator.labels)),
        "epochs": history,
        "final": history[-1],
        "seconds": time.perf_counter() - started,
    }
    write_json(Path(cfg.out) / "central.json", result)
    return result
