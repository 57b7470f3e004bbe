"""The names medfed knows, each declared once: tasks, their networks, strategies, metrics.

Everything else (RunConfig's checks, the CLI's choices, a site's run policy, the plots and the
results tables) reads these. Adding a task or a strategy starts here; the code that runs it
(common.training.tasks, server.tasks, server.strategies) is then looked up by the same name.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class Task(StrEnum):
    """What the federation learns."""

    classify = "classify"
    segment = "segment"
    autoencode = "autoencode"
    synthesize = "synthesize"


class Strategy(StrEnum):
    """Aggregation strategies: Flower's, and SCAFFOLD built on Flower's FedAvg."""

    fedavg = "fedavg"
    fedprox = "fedprox"
    fedadam = "fedadam"
    fedyogi = "fedyogi"
    fedmedian = "fedmedian"
    fedtrimmedavg = "fedtrimmedavg"
    krum = "krum"
    scaffold = "scaffold"


TASKS = tuple(t.value for t in Task)
STRATEGIES = tuple(s.value for s in Strategy)
# strategies whose aggregate is a (weighted) mean of the updates: what central DP's sensitivity
# analysis and secure aggregation's masked sum both assume
MEAN_STRATEGIES = (Strategy.fedavg.value, Strategy.fedprox.value)
# the networks each task can train; the first is the task's default (`--model` left empty)
TASK_MODELS: Mapping[str, tuple[str, ...]] = {
    Task.classify: ("cnn", "resnet18", "resnet34", "densenet121"),
    Task.segment: ("unet",),
    Task.autoencode: ("autoencoder",),
    Task.synthesize: ("cgan",),
}
MODELS = tuple(m for models in TASK_MODELS.values() for m in models)

# --- metrics -----------------------------------------------------------------------------------
# The aggregator's (central) evaluation names a metric in snake_case; a site's reply names the
# metrics of the autoencoder and the GAN in kebab-case (Flower's MetricRecord keys as the sites
# have always sent them, kept so that recorded runs still read). ANOMALY_AUROC and
# SITE_ANOMALY_AUROC are the one metric under its two recorded spellings.
ANOMALY_AUROC = "anomaly_auroc"
SITE_ANOMALY_AUROC = "anomaly-auroc"

# central metrics, over all tasks, that lie in [0, 1]: what per-round plots draw on one axis (a
# GAN's Frechet distance and every loss are unbounded and stay in the tables)
RATE_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "dice",
                "iou", ANOMALY_AUROC)
# the direction of each site metric, for the worst site: the lowest of these ...
HIGHER_IS_BETTER = frozenset({
    "auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "dice", "iou", "nsd",
    SITE_ANOMALY_AUROC,
})
# ... and the highest of these. A metric in neither (a GAN discriminator's accuracy, which is
# best near 0.5) gets a mean and a spread but no worst site.
LOWER_IS_BETTER = frozenset({"loss", "hd95", "ece", "brier", "generator-loss"})
# the per-site validation metric that metrics.png shows for each task
SITE_PLOT_METRIC: Mapping[str, str] = {
    Task.classify: "auc", Task.segment: "dice", Task.autoencode: SITE_ANOMALY_AUROC,
    Task.synthesize: "d-accuracy",
}
# what a round's progress line shows: the first of these the round reports (central first)
HEADLINE_METRICS = ("auc", "dice", ANOMALY_AUROC, SITE_ANOMALY_AUROC, "fid")
# the final model's metrics a finished run prints, in this order
FINAL_METRICS = (
    "auc", "threshold", "sensitivity", "specificity", "balanced_accuracy", "accuracy", "ece",
    "brier", "dice", "iou", "hd95", "nsd", ANOMALY_AUROC, "fid", "tstr_auc", "trtr_auc",
    "tstr_ratio", "loss",
)
