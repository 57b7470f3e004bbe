"""Classification metrics used by sites (federated evaluation) and the aggregator (central)."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score

from common.operating import DEFAULT_THRESHOLD, brier, ece
from common.registry import RATE_METRICS as RATE_METRICS  # declared there, read here too


def classification_metrics(
    probabilities: np.ndarray, labels: np.ndarray, *, threshold: float | None = None
) -> dict[str, float]:
    """AUC, accuracy, sensitivity, specificity, balanced accuracy, ECE and Brier score.

    Binary tasks treat class 1 as positive and call an image positive when P(positive) >=
    `threshold` (the run's operating point, common.operating; None: 0.5, i.e. argmax). With
    more classes, predictions are the argmax, AUC is one-vs-rest macro, sensitivity/specificity
    are macro averages over classes and balanced accuracy is the mean recall over classes. A
    metric that is undefined on this data (AUC with one class present, sensitivity without
    positives) is NaN, never a made-up 0.
    """
    if probabilities.ndim != 2 or len(probabilities) != len(labels):
        raise ValueError(
            f"probabilities must be (N, classes) matching {len(labels)} labels, "
            f"got {probabilities.shape}"
        )
    n_classes = probabilities.shape[1]
    if len(labels) == 0:
        nan = float("nan")
        return {"auc": nan, "accuracy": nan, "sensitivity": nan, "specificity": nan,
                "balanced_accuracy": nan, "ece": nan, "brier": nan}
    if n_classes == 2:
        cut = DEFAULT_THRESHOLD if threshold is None else threshold
        predictions = (probabilities[:, 1] >= cut).astype(np.int64)
    else:
        predictions = probabilities.argmax(axis=1)
    accuracy = float((predictions == labels).mean())
    present = np.unique(labels)
    if len(present) < 2:
        auc = float("nan")
    elif n_classes == 2:
        auc = float(roc_auc_score(labels, probabilities[:, 1]))
    else:
        auc = float(
            roc_auc_score(labels, probabilities, multi_class="ovr", labels=list(range(n_classes)))
        )
    classes = [1] if n_classes == 2 else list(range(n_classes))
    sens, spec = [], []
    for c in classes:
        positive, predicted = labels == c, predictions == c
        sens.append(_ratio(np.sum(positive & predicted), np.sum(positive)))
        spec.append(_ratio(np.sum(~positive & ~predicted), np.sum(~positive)))
    if n_classes == 2:
        balanced = _nanmean([sens[0], spec[0]])
    else:
        balanced = _nanmean([_ratio(np.sum((labels == c) & (predictions == c)),
                                    np.sum(labels == c)) for c in classes])
    return {
        "auc": auc,
        "accuracy": accuracy,
        "sensitivity": _nanmean(sens),
        "specificity": _nanmean(spec),
        "balanced_accuracy": balanced,
        "ece": ece(probabilities, labels),
        "brier": brier(probabilities, labels),
    }


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")
