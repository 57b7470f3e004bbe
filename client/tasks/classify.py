"""Classification: a CNN on labelled images, cross-entropy; AUC, accuracy, sensitivity."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from client.tasks.base import Fit, Samples, SplitLoader, build, preprocess
from client.train import TrainReport, evaluate, train_local, train_local_dp
from common.config import RunConfig
from common.sites import SiteRef
from models.autoencoder import CLASSIFIER_FEATURES_PREFIX as FEATURES_PREFIX


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
        """The CNN classifier."""
        return build(cfg)

    def train(self, model: nn.Module, samples: Samples, cfg: RunConfig, fit: Fit) -> TrainReport:
        """Cross-entropy training, DP-SGD when `fit.privacy` is set.

        The feature blocks learn at --lr times --encoder-lr-scale (0: frozen, only the head
        trains); requires_grad is set afresh every round, the network being reused.
        """
        images, labels = samples
        fit = fit.with_settings(lr_scales=((FEATURES_PREFIX, cfg.encoder_lr_scale),))
        if fit.privacy is not None:
            return train_local_dp(
                model, images, labels, settings=fit.settings, device=fit.device,
                privacy=fit.privacy, proximal=fit.proximal,
            )
        return train_local(
            model, images, labels, settings=fit.settings, device=fit.device, seed=fit.seed,
            proximal=fit.proximal,
        )

    def evaluate(
        self, model: nn.Module, samples: Samples, cfg: RunConfig, device: torch.device
    ) -> dict[str, float]:
        """Loss, AUC, accuracy, sensitivity, specificity."""
        images, labels = samples
        return evaluate(model, images, np.asarray(labels), device=device)
