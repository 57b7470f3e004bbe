"""Autoencoding: a convolutional autoencoder on every image, labelled or not (no labels needed).

Its reconstruction error is an anomaly score. A lesion is local, so the score is the largest
error averaged over a small window (ANOMALY_WINDOW pixels across), not the image's mean error,
which a small lesion barely moves. Labelled images give that score's AUROC for lesion (label >= 1)
against normal (label 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F  # noqa: N812

from client.tasks.base import Fit, Samples, SplitLoader, batched, build, preprocess, site_data
from client.train import TrainReport, tensor_dataset
from common.config import RunConfig
from common.sites import SiteRef

ANOMALY_WINDOW = 7


def reconstruction_loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean squared reconstruction error (per sample, then the batch mean)."""
    (images,) = batch
    return F.mse_loss(model(images), images)


def anomaly_scores(model: nn.Module, images: np.ndarray, device: torch.device) -> np.ndarray:
    """Per image: the largest windowed mean squared reconstruction error, (N,)."""
    model.to(device).eval()

    def score(x: torch.Tensor) -> torch.Tensor:
        error = (model(x) - x).pow(2).mean(dim=1, keepdim=True)
        local = F.avg_pool2d(error, ANOMALY_WINDOW, stride=1, padding=ANOMALY_WINDOW // 2)
        return local.flatten(1).amax(dim=1)

    return batched(score, images, device)


def anomaly_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC of `scores` for label >= 1 against label 0; unlabelled (-1) left out."""
    keep = labels >= 0
    positive = labels[keep] >= 1
    if positive.all() or not positive.any():
        return math.nan
    return float(roc_auc_score(positive, scores[keep]))


@torch.no_grad()
def reconstruction_error(model: nn.Module, images: np.ndarray, device: torch.device) -> float:
    """Mean squared reconstruction error over `images`."""
    model.to(device).eval()
    errors = batched(lambda x: (model(x) - x).pow(2).flatten(1).mean(dim=1), images, device)
    return float(errors.mean()) if len(errors) else math.nan


class AutoencodeTask:
    """`--task autoencode`: learns from every readable image; labels only score anomalies."""

    name = "autoencode"
    metrics = frozenset({"loss", "anomaly-auroc"})

    def load(self, site: SiteRef, cfg: RunConfig, split: str, labelled: SplitLoader) -> Samples:
        """Every image of `split` and its label (-1: unlabelled)."""
        arrays = site_data(site, preprocess(cfg), cfg.seed).split(split)
        return arrays.images, arrays.labels

    def build(self, cfg: RunConfig) -> nn.Module:
        """The autoencoder."""
        return build(cfg)

    def train(self, model: nn.Module, samples: Samples, cfg: RunConfig, fit_: Fit) -> TrainReport:
        """Reconstruction training on the images only, DP-SGD when `fit_.privacy` is set."""
        dataset = tensor_dataset(samples[0], dtypes=(torch.float32,))
        return fit_.run(model, dataset, reconstruction_loss)

    def evaluate(
        self, model: nn.Module, samples: Samples, cfg: RunConfig, device: torch.device
    ) -> dict[str, float]:
        """Reconstruction loss, and the anomaly score's AUROC on the labelled images."""
        images, labels = samples
        return {
            "loss": reconstruction_error(model, images, device),
            "anomaly-auroc": anomaly_auroc(anomaly_scores(model, images, device), labels),
        }
