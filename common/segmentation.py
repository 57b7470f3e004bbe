"""Segmentation metrics shared by sites (federated evaluation) and the aggregator (central).

The arithmetic is MONAI's (`compute_dice`, `compute_iou`, `compute_hausdorff_distance`,
`compute_surface_dice`), so medfed's figures are the ones the field reports; what is medfed's
own is only how images are pooled and what an empty structure counts as.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import (
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
)

# Normalised surface distance: a boundary pixel counts as right within this many pixels (voxels)
# of the true boundary, at the resolution the network sees. One pixel is the tolerance of a
# rater redrawing a boundary on the same grid (Nikolov et al.'s NSD, Metrics Reloaded).
NSD_TOLERANCE = 1.0


def _one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """(N, *spatial) integer labels -> (N, C, *spatial) float one-hot."""
    tensor = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return torch.nn.functional.one_hot(tensor, num_classes).movedim(-1, 1).float()


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
    if num_classes < 2:
        return {"dice": math.nan, "iou": math.nan}
    # all images as one: (1, C, pixels)
    pred = _one_hot(predicted.reshape(1, -1), num_classes)
    true = _one_hot(truth.reshape(1, -1), num_classes)
    dice = compute_dice(pred, true, include_background=False, ignore_empty=False)[0]
    iou = compute_iou(pred, true, include_background=False, ignore_empty=False)[0]
    # MONAI scores a class absent from both as 1; here it is undefined
    absent = (pred[0, 1:].sum(dim=-1) + true[0, 1:].sum(dim=-1)) == 0
    dice[absent], iou[absent] = math.nan, math.nan
    for c in range(1, num_classes):
        out[f"dice-c{c}"], out[f"iou-c{c}"] = float(dice[c - 1]), float(iou[c - 1])
    out["dice"] = _nanmean(dice.tolist())
    out["iou"] = _nanmean(iou.tolist())
    return out


def _distances(
    predicted: np.ndarray, truth: np.ndarray, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """HD95 and NSD per image and foreground class (N, C-1); NaN where either mask is empty."""
    pred = _one_hot(predicted, num_classes)
    true = _one_hot(truth, num_classes)
    spatial = tuple(range(2, pred.dim()))
    both = (pred.sum(dim=spatial) > 0)[:, 1:] & (true.sum(dim=spatial) > 0)[:, 1:]
    with warnings.catch_warnings():  # MONAI warns on every empty mask, which is counted below
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(pred, true, include_background=False, percentile=95)
        nsd = compute_surface_dice(
            pred, true, [NSD_TOLERANCE] * (num_classes - 1), include_background=False
        )
    nan = torch.tensor(math.nan)
    return torch.where(both, hd95.float(), nan), torch.where(both, nsd.float(), nan)


def hausdorff95(predicted: np.ndarray, truth: np.ndarray) -> float:
    """95th-percentile symmetric surface distance (pixels) of two binary masks, 2D or 3D.

    NaN when either mask is empty (the distance is undefined).
    """
    hd95, _ = _distances(
        np.asarray(predicted, bool)[None].astype(np.int64),
        np.asarray(truth, bool)[None].astype(np.int64), 2,
    )
    return float(hd95[0, 0])


def surface_metrics(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> dict[str, float]:
    """Mean HD95 (pixels) and normalised surface distance over images and foreground classes.

    Both are averaged over the (image, class) pairs where prediction and truth both hold the
    class: a missed or invented structure is Dice's to count, and a distance to nothing is
    undefined. Also `nsd-cK` per class.
    """
    if len(predicted) == 0 or num_classes < 2:
        return {"hd95": math.nan, "nsd": math.nan}
    hd95, nsd = _distances(predicted, truth, num_classes)
    out = {"hd95": _nanmean(hd95.flatten().tolist()), "nsd": _nanmean(nsd.flatten().tolist())}
    for c in range(1, num_classes):
        out[f"nsd-c{c}"] = _nanmean(nsd[:, c - 1].tolist())
    return out


def mean_hausdorff95(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Mean HD95 over images and foreground classes where both masks hold the class."""
    return surface_metrics(predicted, truth, num_classes)["hd95"]


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan
