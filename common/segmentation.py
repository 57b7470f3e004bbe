"""Segmentation metrics shared by sites (federated evaluation) and the aggregator (central)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def overlap_metrics(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> dict[str, float]:
    """Dice and IoU per foreground class, pooled over every pixel of every image.

    Pooling (rather than averaging per image) keeps images without the structure, where a
    per-image Dice is undefined, in the score: a false positive on a normal image costs.
    Returns `dice-cK`, `iou-cK` per class K >= 1, and `dice`, `iou`: their means. A class absent
    from both prediction and truth has NaN scores (undefined, not perfect).
    """
    if predicted.shape != truth.shape:
        raise ValueError(f"prediction {predicted.shape} and truth {truth.shape} differ in shape")
    out: dict[str, float] = {}
    dices, ious = [], []
    for c in range(1, num_classes):
        p, t = predicted == c, truth == c
        inter, total = float(np.sum(p & t)), float(np.sum(p) + np.sum(t))
        union = total - inter
        dice = 2 * inter / total if total else math.nan
        iou = inter / union if union else math.nan
        out[f"dice-c{c}"], out[f"iou-c{c}"] = dice, iou
        dices.append(dice)
        ious.append(iou)
    out["dice"] = _nanmean(dices)
    out["iou"] = _nanmean(ious)
    return out


def hausdorff95(predicted: np.ndarray, truth: np.ndarray) -> float:
    """95th-percentile symmetric surface distance (pixels) of two 2D binary masks.

    NaN when either mask is empty (the distance is undefined).
    """
    if not predicted.any() or not truth.any():
        return math.nan
    surface_p = predicted ^ ndimage.binary_erosion(predicted)
    surface_t = truth ^ ndimage.binary_erosion(truth)
    to_t = ndimage.distance_transform_edt(~surface_t)
    to_p = ndimage.distance_transform_edt(~surface_p)
    distances = np.concatenate([to_t[surface_p], to_p[surface_t]])
    return float(np.percentile(distances, 95))


def mean_hausdorff95(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Mean HD95 over images and foreground classes where both masks hold the class."""
    values = [
        hausdorff95(p == c, t == c)
        for p, t in zip(predicted, truth, strict=True)
        for c in range(1, num_classes)
    ]
    return _nanmean(values)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan
