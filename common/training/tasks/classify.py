"""Classification: a CNN on labelled images, cross-entropy; AUC, accuracy, sensitivity.

Label skew: hospitals rarely hold the classes in the same proportions, and a referral clinic may
hold one class only. Trained with plain cross-entropy, such a site teaches the global model that
everyone has its class. With logit adjustment (balanced softmax; Menon et al., ICLR 2021; FedLC,
Zhang et al., ICML 2022) each site trains on logits shifted by tau * log(its class prior), so the
model's own logits learn what tells the classes apart rather than how common each is at that
site; at inference the logits are used as they are. Without DP a site counts its training
labels; under DP it uses its validation split's counts, released once with Gaussian noise and
accounted on those images (client.validation), so DP-SGD's own analysis stays exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from common.config import RunConfig
from common.metrics import classification_metrics
from common.operating import HISTOGRAM_NOISE, RELEASE, score_histograms
from common.registry import Task
from common.sites import SiteRef
from common.training.augment import augmented
from common.training.loop import TrainReport, labelled_dataset, predict
from common.training.tasks.base import Fit, Samples, SplitLoader, build, preprocess
from models import classifier_head

# Released once per DP run (from the validation split) when --logit-adjust > 0: one image moves
# one count by one (L2 sensitivity 1); noise 5 leaves a count of 100 within 10% of its value.
CLASS_COUNTS = "class-counts"
CLASS_COUNTS_NOISE = 5.0
# A binary classifier's validation-score histograms (common.operating), released once per DP
# run, in the final round, so the aggregator can choose the operating point. Noise 2 per count
# was measured (4 sites, 390 validation images, AUC 0.95): the threshold chosen on the noisy
# sums loses 0.006 balanced accuracy on average (0.018 at the 90th centile) against the
# noiseless choice. The release is accounted on the validation images (client.validation),
# apart from DP-SGD's training budget.
VAL_SCORES = RELEASE
VAL_SCORES_NOISE = HISTOGRAM_NOISE


def log_prior(counts: np.ndarray) -> np.ndarray:
    """The log of a site's class prior from (possibly noisy) counts, one pseudo-count per class.

    A class the site never saw gets a small prior rather than zero, so its logit is shifted by
    a finite amount (about -log(N) at a one-class site of N images).
    """
    clean = np.clip(np.nan_to_num(np.asarray(counts, dtype=np.float64)), 0.0, None) + 1.0
    return np.log(clean / clean.sum())


def adjusted_cross_entropy(
    shift: torch.Tensor,
) -> Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor]:
    """Cross-entropy on logits + `shift` (per class): balanced softmax when shift = log prior."""

    def loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return nn.functional.cross_entropy(logits + shift.to(logits.device), y)

    return loss


@runtime_checkable
class Scored(Protocol):
    """A task whose evaluation has a binary operating point and score histograms."""

    def evaluate_scored(
        self, model: nn.Module, samples: Samples, cfg: RunConfig, device: torch.device,
        *, threshold: float | None = None,
    ) -> tuple[dict[str, float], np.ndarray | None]:
        """Metrics at `threshold`, and the (2, bins) score histograms (None: not binary)."""
        ...


class ClassifyTask:
    """`--task classify` (the default). Unlabelled images are skipped."""

    name = Task.classify.value
    metrics = frozenset({"auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy",
                         "ece", "brier", "loss"})

    def load(self, site: SiteRef, cfg: RunConfig, split: str, labelled: SplitLoader) -> Samples:
        """The labelled images and labels of `split`."""
        images, labels = labelled(site, preprocess(cfg), cfg.seed, split)
        if len(labels) and int(labels.max()) >= cfg.num_classes:
            raise ValueError(
                f"site {site.name}: label {int(labels.max())} found but the run has "
                f"--num-classes {cfg.num_classes}; labels must be 0..{cfg.num_classes - 1}"
            )
        return images, labels

    def build(self, cfg: RunConfig) -> nn.Module:
        """The run's classifier network (--model)."""
        return build(cfg)

    def releases(self, cfg: RunConfig) -> dict[str, float]:
        """The class counts (when logit adjustment uses them); a binary classifier's scores."""
        planned = {CLASS_COUNTS: CLASS_COUNTS_NOISE} if cfg.logit_adjust > 0 else {}
        if cfg.num_classes == 2 and not cfg.secure_agg:  # SecAgg+ replies carry no histogram
            planned[VAL_SCORES] = VAL_SCORES_NOISE
        return planned

    def train(self, model: nn.Module, samples: Samples, cfg: RunConfig, fit: Fit) -> TrainReport:
        """Cross-entropy training (logit-adjusted), DP-SGD when `fit.privacy` is set.

        Every layer but the head learns at --lr times --encoder-lr-scale (0: frozen, only the
        head trains); requires_grad is set afresh every round, the network being reused.
        """
        images, labels = samples
        # first matching prefix wins: the head at --lr, every other parameter scaled
        scales = ((classifier_head(cfg.model), 1.0), ("", cfg.encoder_lr_scale))
        fit = fit.with_settings(lr_scales=scales)
        shift = torch.zeros(cfg.num_classes)
        if cfg.logit_adjust > 0:
            counts = (
                np.bincount(np.asarray(labels, dtype=np.int64), minlength=cfg.num_classes)
                if fit.privacy is None else fit.class_counts
            )
            if counts is not None:
                shift = torch.as_tensor(cfg.logit_adjust * log_prior(counts),
                                        dtype=torch.float32)
        loss = adjusted_cross_entropy(shift)
        if cfg.augment:
            loss = augmented(loss, torch.Generator().manual_seed(fit.seed))
        return fit.run(model, labelled_dataset(images, labels), loss)

    def evaluate(
        self, model: nn.Module, samples: Samples, cfg: RunConfig, device: torch.device
    ) -> dict[str, float]:
        """Loss, AUC, accuracy, sensitivity, specificity... at P(positive) >= 0.5 (argmax)."""
        return self.evaluate_scored(model, samples, cfg, device)[0]

    def evaluate_scored(
        self, model: nn.Module, samples: Samples, cfg: RunConfig, device: torch.device,
        *, threshold: float | None = None,
    ) -> tuple[dict[str, float], np.ndarray | None]:
        """The metrics at `threshold` (a binary operating point; None: 0.5), and histograms.

        The histograms, for two classes only, count P(positive) per class in fixed bins
        (common.operating): shape (2, bins).
        """
        images, labels = samples
        labels = np.asarray(labels)
        probs, loss = predict(model, images, labels, device=device)
        metrics = classification_metrics(probs, labels, threshold=threshold)
        metrics["loss"] = loss
        if cfg.num_classes != 2:
            return metrics, None
        return metrics, score_histograms(probs[:, 1], labels)
