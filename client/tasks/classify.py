"""Classification: a CNN on labelled images, cross-entropy; AUC, accuracy, sensitivity.

Label skew: hospitals rarely hold the classes in the same proportions, and a referral clinic may
hold one class only. Trained with plain cross-entropy, such a site teaches the global model that
everyone has its class. With logit adjustment (balanced softmax; Menon et al., ICLR 2021; FedLC,
Zhang et al., ICML 2022) each site trains on logits shifted by tau * log(its class prior), so the
model's own logits learn what tells the classes apart rather than how common each is at that
site; at inference the logits are used as they are. A site's class counts never leave it; under
DP they are released once, with Gaussian noise, into the training of its own model and accounted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from client.tasks.base import Fit, Samples, SplitLoader, build, preprocess
from client.train import TrainReport, evaluate, labelled_dataset
from common.config import RunConfig
from common.sites import SiteRef
from models import classifier_head

# Released once per DP run when --logit-adjust > 0: one sample moves one count by one (L2
# sensitivity 1). Noise 5 costs a few hundredths of epsilon and leaves a count of 100 within
# 10% of its value.
CLASS_COUNTS = "class-counts"
CLASS_COUNTS_NOISE = 5.0


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


class ClassifyTask:
    """`--task classify` (the default). Unlabelled images are skipped."""

    name = "classify"
    metrics = frozenset({"auc", "accuracy", "sensitivity", "specificity", "loss"})

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
        """The class counts, when logit adjustment uses them."""
        return {CLASS_COUNTS: CLASS_COUNTS_NOISE} if cfg.logit_adjust > 0 else {}

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
            counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=cfg.num_classes)
            if fit.privacy is not None:
                counts = fit.privacy.release(CLASS_COUNTS, counts)
            shift = torch.as_tensor(cfg.logit_adjust * log_prior(counts), dtype=torch.float32)
        return fit.run(model, labelled_dataset(images, labels), adjusted_cross_entropy(shift))

    def evaluate(
        self, model: nn.Module, samples: Samples, cfg: RunConfig, device: torch.device
    ) -> dict[str, float]:
        """Loss, AUC, accuracy, sensitivity, specificity."""
        images, labels = samples
        return evaluate(model, images, np.asarray(labels), device=device)
