"""Autoencoding: a convolutional autoencoder on every image, labelled or not (no labels needed).

Its reconstruction error is an anomaly score. A lesion is a compact spot brighter than the tissue
around it, and a narrow code (under DP-SGD also a noisy decoder) reconstructs it as the
background it sits in, too dark. So the score looks for a bright spot in the residual (image
minus reconstruction) at the lesion's scale: the residual's mean over a lesion-sized window
minus its mean over a wider one around it (a box difference-of-means blob detector), largest
over the image. A residual merely offset over a region (a site's intensities the model has not
learned) cancels, one along an edge (an organ border the decoder blurs) is diluted, and a dark
miss (the image darker than the reconstruction) scores low; the image's mean squared error, or
its largest windowed squared error, mixes all of these with the lesion. Every image is scored
the same way, without labels; labelled images give the score's AUROC for lesion (label >= 1)
against normal (label 0).

With --spot-weight, the same map, computed against the model's own reconstruction, is also a
training target: the encoder's spot head learns to predict it at the code's resolution (largest
value per cell). This is what makes the encoder worth handing to a classifier (`--init-encoder`):
reconstruction alone teaches it the common anatomy and to leave lesions out, the spot term
teaches it to find what the anatomy does not explain. The target needs no label, is computed
per image from that image only (DP-SGD's per-sample gradients stay exact), and is held fixed
(no gradient flows through the reconstruction into it). Under DP-SGD the term shares the
clipping norm with the reconstruction, so the anomaly score is better without it (README, Tasks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F  # noqa: N812

from common.config import RunConfig
from common.registry import SITE_ANOMALY_AUROC, Task
from common.sites import SiteRef
from common.training.loop import LossFn, TrainReport, tensor_dataset
from common.training.tasks.base import (
    Fit,
    Samples,
    SplitLoader,
    batched,
    build,
    preprocess,
    site_data,
)

# Centre and surround windows of the blob detector, as fractions of the image side: the centre
# spans a conspicuous nodule (30-60 mm in a ~400 mm field of view: 5 to 10 pixels at 64), the
# surround the tissue around it. Picked on a second synthetic federation (`medfed synth --seed
# 1`), not on the held-out set the README reports.
ANOMALY_CENTRE = 5 / 64
ANOMALY_SURROUND = 11 / 64
# The spot term: anomaly map values (about 0.01 for tissue, 0.1 to 0.3 over a missed nodule)
# times SPOT_SCALE are order 1; --spot-weight weighs the term against the reconstruction error.
SPOT_SCALE = 10.0
SPOT_HEAD_PREFIX = "spot_head."


def spot_target(
    images: torch.Tensor, reconstructions: torch.Tensor, size: torch.Size
) -> torch.Tensor:
    """The spot head's target: the anomaly map's largest value in each cell of `size`, scaled."""
    spots = anomaly_map(images, reconstructions.detach())
    pool = F.adaptive_max_pool2d if spots.dim() == 4 else F.adaptive_max_pool3d
    return pool(spots, tuple(size)) * SPOT_SCALE


def reconstruction_loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean squared reconstruction error (per sample, then the batch mean)."""
    (images,) = batch
    return F.mse_loss(model(images), images)


def spot_loss(weight: float) -> LossFn:
    """Reconstruction error plus `weight` times the spot term (per sample, then the batch mean)."""

    def loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        (images,) = batch
        reconstructions, spots = model(images, spots=True)
        target = spot_target(images, reconstructions, spots.shape[2:])
        return F.mse_loss(reconstructions, images) + weight * F.mse_loss(spots, target)

    return loss


def _odd_window(fraction: float, side: int) -> int:
    return max(1, 2 * round((fraction * side - 1) / 2) + 1)


def anomaly_map(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Bright-spot response of the residual, (N, 1, *spatial): centre mean minus surround mean.

    A spot the reconstruction misses (the image brighter than it over a lesion-sized window)
    scores high; a residual that is flat over a region cancels, and one along an edge is diluted
    by the surround. Images (N, C, H, W) or volumes (N, C, D, H, W).
    """
    residual = (images - reconstructions).mean(dim=1, keepdim=True)
    side = min(images.shape[2:])
    avg_pool = F.avg_pool2d if images.dim() == 4 else F.avg_pool3d

    def local_mean(fraction: float) -> torch.Tensor:
        k = _odd_window(fraction, side)
        # count_include_pad=False: the zero padding must not read as a dark rim at the border
        return avg_pool(residual, k, stride=1, padding=k // 2, count_include_pad=False)

    return local_mean(ANOMALY_CENTRE) - local_mean(ANOMALY_SURROUND)


def anomaly_scores(model: nn.Module, images: np.ndarray, device: torch.device) -> np.ndarray:
    """Per image: the largest value of its anomaly map (higher: more likely a lesion), (N,)."""
    model.to(device).eval()
    return batched(lambda x: anomaly_map(x, model(x)).flatten(1).amax(dim=1), images, device)


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

    name = Task.autoencode.value
    metrics = frozenset({"loss", SITE_ANOMALY_AUROC})

    def load(self, site: SiteRef, cfg: RunConfig, split: str, labelled: SplitLoader) -> Samples:
        """Every image of `split` and its label (-1: unlabelled)."""
        arrays = site_data(site, preprocess(cfg), cfg.seed).split(split)
        return arrays.images, arrays.labels

    def releases(self, cfg: RunConfig) -> dict[str, float]:
        """None: DP-SGD's steps are all this task spends."""
        return {}

    def build(self, cfg: RunConfig) -> nn.Module:
        """The autoencoder."""
        return build(cfg)

    def train(self, model: nn.Module, samples: Samples, cfg: RunConfig, fit_: Fit) -> TrainReport:
        """Reconstruction training on the images only, DP-SGD when `fit_.privacy` is set.

        With --spot-weight, the spot term too (module docstring); without, the spot head stays
        as initialised.

        Under DP-SGD the clipping norm matters more here than for a classifier: a trained
        autoencoder's per-sample gradient norms are small (about 0.16 on `medfed synth` data
        at 64 px), while DP-SGD's noise is proportional to the clipping norm whatever their
        size, so the default --max-grad-norm 1.0 leaves most of each step noise; 0.1 takes the
        anomaly AUROC at epsilon 8 from about 0.85 to about 0.9 (README, Tasks).
        """
        dataset = tensor_dataset(samples[0], dtypes=(torch.float32,))
        if cfg.spot_weight > 0:
            return fit_.run(model, dataset, spot_loss(cfg.spot_weight))
        # the spot head gets no gradient: frozen, so Opacus expects no per-sample gradient of it
        frozen = fit_.with_settings(lr_scales=((SPOT_HEAD_PREFIX, 0.0),))
        return frozen.run(model, dataset, reconstruction_loss)

    def evaluate(
        self, model: nn.Module, samples: Samples, cfg: RunConfig, device: torch.device
    ) -> dict[str, float]:
        """Reconstruction loss, and the anomaly score's AUROC on the labelled images."""
        images, labels = samples
        return {
            "loss": reconstruction_error(model, images, device),
            SITE_ANOMALY_AUROC: anomaly_auroc(anomaly_scores(model, images, device), labels),
        }
