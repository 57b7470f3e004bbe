"""A binary classifier's operating point, chosen from sites' score histograms (no Flower here).

No image and no per-image score leaves a hospital to choose the threshold: each site counts its
validation images' P(positive) in fixed bins, one histogram per class (`score_histograms`), the
aggregator sums the sites' counts (`sum_histograms`) and reads the federated ROC off the sums
(`roc_from_histograms`): the sensitivity and specificity at every bin edge are exactly those of
the pooled validation scores at that threshold, and the AUC is the pooled AUC within the bins'
resolution. The threshold is Youden's J maximum, or the highest threshold that still reaches a
target sensitivity (`choose_threshold`), as screening programmes ask.

The bins are uniform on the logit of P(positive), clamped at both ends, so thresholds resolve
finely near 0 and 1 where a trained model's scores crowd. A score s falls in bin i when
`THRESHOLDS[i-1] <= s < THRESHOLDS[i]` (the first bin takes everything below THRESHOLDS[0], the
last everything from THRESHOLDS[-1] up); "positive" means `s >= threshold`, so the bin edges
and a per-image evaluation at an edge agree to the last bit.

Under DP a site's histograms are released once with Gaussian noise (sensitivity 1: one image
moves one count by one); noisy counts can be negative, so the ROC is built from cumulative
counts made monotone (isotonic regression) and rates clipped to [0, 1].

Per-image calibration (`ece`, `brier`) is for the aggregator's own test set, where per-image
scores are allowed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# 48 bins of 0.25 logit over [-6, 6]: P(positive) steps of about 0.06 near 0.5 and reaches
# 0.0025 / 0.9975 at the clamped ends. Fewer bins would coarsen the threshold; more would add
# noise to every cumulative count under DP (noise grows with the square root of the bins summed).
BINS = 48
LOGIT_RANGE = 6.0
_INNER_LOGITS = np.linspace(-LOGIT_RANGE, LOGIT_RANGE, BINS + 1)[1:-1]
# The BINS - 1 inner bin edges as probabilities, increasing: the thresholds a histogram resolves.
THRESHOLDS: np.ndarray = 1.0 / (1.0 + np.exp(-_INNER_LOGITS))

# The metric keys a site's evaluation reply carries its histograms under, per class (0, 1).
HIST_KEYS = ("score-hist-0", "score-hist-1")
# The release name in a site's privacy plan (common.privacy.PrivacyState.release).
RELEASE = "val-scores"
# The Gaussian noise on each count of a site's histograms in a DP run
# (common.training.tasks.classify releases them with it; the aggregator needs it to tell a
# class from noise).
HISTOGRAM_NOISE = 2.0
# Default threshold before any operating point is chosen: argmax of two classes.
DEFAULT_THRESHOLD = 0.5
# Below this balanced accuracy at its operating point a classifier is flagged (`warnings_for`):
# 0.5 is chance, and a model that barely beats it on either class is not one to deploy.
BALANCED_ACCURACY_FLOOR = 0.6
# Equal-width bins of the expected calibration error (Guo et al., 2017 use 15).
ECE_BINS = 15


def bin_index(scores: np.ndarray) -> np.ndarray:
    """Each score's bin, 0..BINS-1 (see the module docstring for the rule)."""
    return np.searchsorted(THRESHOLDS, np.asarray(scores, dtype=np.float64), side="right")


def score_histograms(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Counts of P(positive) per bin for class 0 and class 1: shape (2, BINS), float64."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    bins = bin_index(scores)
    return np.stack(
        [np.bincount(bins[labels == c], minlength=BINS).astype(np.float64) for c in (0, 1)]
    )


def sum_histograms(histograms: Iterable[np.ndarray]) -> np.ndarray:
    """The federation's histograms: the sites' (2, BINS) counts summed."""
    total = np.zeros((2, BINS))
    for h in histograms:
        h = np.asarray(h, dtype=np.float64)
        if h.shape != (2, BINS):
            raise ValueError(f"a score histogram must have shape (2, {BINS}), got {h.shape}")
        total += h
    return total


def histograms_from_metrics(metrics: Mapping[str, object]) -> np.ndarray | None:
    """A site's histograms out of its evaluation metrics, or None when it sent none."""
    rows = [metrics.get(key) for key in HIST_KEYS]
    if not all(isinstance(r, list | tuple | np.ndarray) and len(r) == BINS for r in rows):
        return None
    return np.asarray(rows, dtype=np.float64)


def _non_increasing(values: np.ndarray) -> np.ndarray:
    """The least-squares non-increasing fit of `values` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, size]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            m2, n2 = blocks.pop()
            m1, n1 = blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return np.concatenate([np.full(int(n), m) for m, n in blocks])


def _rates(counts: np.ndarray, min_total: float = 0.5) -> tuple[np.ndarray, np.ndarray, float]:
    """The share of a class at or above bin j and below it, for j = 0..BINS, and its total.

    Exact for true counts (each rate is a count over the total, as a per-image mean gives);
    for noisy ones the cumulative counts are made non-increasing and the rates clipped to
    [0, 1]. NaN rates when the class (by its counts) is absent: fewer than `min_total`.
    """
    cumulative = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])
    if np.any(np.diff(cumulative) > 0):  # only noise can make a count negative
        cumulative = _non_increasing(cumulative)
        cumulative = cumulative - cumulative[-1]  # nothing lies above the last edge
    total = float(cumulative[0])
    if total < min_total:  # no image of this class (or noise around none)
        nan = np.full(BINS + 1, math.nan)
        return nan, nan, 0.0
    above = np.clip(cumulative / total, 0.0, 1.0)
    below = np.clip((total - cumulative) / total, 0.0, 1.0)
    return above, below, total


@dataclass(frozen=True)
class Roc:
    """A ROC at thresholds[j], j = 0..BINS: 0, the inner edges, then 1 (nothing positive)."""

    thresholds: np.ndarray
    sensitivity: np.ndarray
    specificity: np.ndarray
    positives: float
    negatives: float

    @property
    def auc(self) -> float:
        """Area under the curve by the trapezoid rule (ties within a bin count half)."""
        if np.isnan(self.sensitivity).any() or np.isnan(self.specificity).any():
            return math.nan
        fpr = 1.0 - self.specificity
        # the points run from (1, 1) down to (0, 0); reverse so FPR increases
        return float(np.trapezoid(self.sensitivity[::-1], fpr[::-1]))


def roc_from_histograms(histograms: np.ndarray, *, noise_std: float = 0.0) -> Roc:
    """The ROC of summed (2, BINS) histograms: sensitivity/specificity at every bin edge.

    `noise_std`: the Gaussian noise of each count (DP). A class whose total is then below
    `absent_below(noise_std)` counts as absent, so a one-class site's missing class is not
    read out of its noise.
    """
    h = np.asarray(histograms, dtype=np.float64)
    if h.shape != (2, BINS):
        raise ValueError(f"score histograms must have shape (2, {BINS}), got {h.shape}")
    floor = absent_below(noise_std)
    sens, _, positives = _rates(h[1], floor)
    _, spec, negatives = _rates(h[0], floor)
    thresholds = np.concatenate([[0.0], THRESHOLDS, [1.0]])
    return Roc(thresholds, sens, spec, positives, negatives)


def absent_below(noise_std: float) -> float:
    """The total under which a class counts as absent: half an image, or 3 noise deviations.

    A class total sums BINS noisy counts, so its noise has deviation noise_std * sqrt(BINS);
    an absent class reaches 3 of those by chance about once in 700.
    """
    return max(0.5, 3.0 * noise_std * math.sqrt(BINS))


def roc_from_scores(scores: np.ndarray, labels: np.ndarray) -> Roc:
    """The pooled ROC of per-image scores at the same thresholds (a check of the above)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    pos, neg = scores[labels == 1], scores[labels == 0]
    inner = [(float(np.mean(pos >= t)) if len(pos) else math.nan,
              float(np.mean(neg < t)) if len(neg) else math.nan) for t in THRESHOLDS]
    sens = np.array([1.0 if len(pos) else math.nan, *(s for s, _ in inner),
                     0.0 if len(pos) else math.nan])
    spec = np.array([0.0 if len(neg) else math.nan, *(s for _, s in inner),
                     1.0 if len(neg) else math.nan])
    return Roc(np.concatenate([[0.0], THRESHOLDS, [1.0]]), sens, spec, float(len(pos)),
               float(len(neg)))


def choose_threshold(roc: Roc, target_sensitivity: float = 0.0) -> int:
    """The index into `roc.thresholds` of the operating point.

    target_sensitivity 0: Youden's J (sensitivity + specificity - 1) at its maximum over the
    inner edges (the middle of a tie); otherwise the highest threshold whose sensitivity is at
    least the target (index 0, everything positive, when no inner edge reaches it).
    Raises ValueError when the ROC is undefined (a class absent from every site).
    """
    if np.isnan(roc.sensitivity).any() or np.isnan(roc.specificity).any():
        raise ValueError(
            "no operating point: the summed validation counts of one class are not positive "
            "(no site holds it in its validation split, or DP noise exceeds the counts of "
            "small sites); the threshold stays at its previous value (0.5 at first)"
        )
    inner = np.arange(1, BINS)
    if target_sensitivity > 0:
        reaching = [j for j in range(BINS + 1) if roc.sensitivity[j] >= target_sensitivity]
        return max(reaching) if reaching else 0
    youden = roc.sensitivity[inner] + roc.specificity[inner] - 1.0
    best = inner[np.isclose(youden, youden.max(), rtol=0.0, atol=1e-12)]
    return int(best[len(best) // 2])


def rates_at(
    histograms: np.ndarray, threshold: float, *, noise_std: float = 0.0
) -> dict[str, float]:
    """Sensitivity, specificity, balanced_accuracy and accuracy of histograms at a threshold.

    `threshold` must be one the bins resolve (0, an entry of THRESHOLDS, or 1); otherwise the
    nearest edge at or below it is used.
    """
    roc = roc_from_histograms(histograms, noise_std=noise_std)
    j = int(np.searchsorted(roc.thresholds, threshold + 1e-12, side="right") - 1)
    j = min(max(j, 0), BINS)
    sens, spec = float(roc.sensitivity[j]), float(roc.specificity[j])
    n = roc.positives + roc.negatives
    correct = (np.nan_to_num(sens) * roc.positives + np.nan_to_num(spec) * roc.negatives)
    return {
        "sensitivity": sens,
        "specificity": spec,
        "balanced_accuracy": _mean_defined([sens, spec]),
        "accuracy": float(correct / n) if n > 0 else math.nan,
    }


@dataclass(frozen=True)
class OperatingPoint:
    """The threshold chosen on the federation's validation histograms, and what it reaches."""

    threshold: float
    rule: str  # "youden" or "sensitivity>=S"
    auc: float
    sensitivity: float
    specificity: float
    balanced_accuracy: float
    accuracy: float
    positives: float
    negatives: float

    def to_json(self) -> dict[str, float | str]:
        """Plain values for results.json (labelled: the sites' validation data)."""
        return {
            "threshold": self.threshold, "rule": self.rule, "auc": self.auc,
            "sensitivity": self.sensitivity, "specificity": self.specificity,
            "balanced_accuracy": self.balanced_accuracy, "accuracy": self.accuracy,
            "positives": self.positives, "negatives": self.negatives,
            "data": "sites' validation splits (summed score histograms)",
        }


def operating_point(histograms: np.ndarray, target_sensitivity: float = 0.0) -> OperatingPoint:
    """Choose the threshold on summed histograms; ValueError when a class is absent."""
    roc = roc_from_histograms(histograms)
    j = choose_threshold(roc, target_sensitivity)
    threshold = float(roc.thresholds[j])
    at = rates_at(histograms, threshold)
    rule = f"sensitivity>={target_sensitivity:g}" if target_sensitivity > 0 else "youden"
    return OperatingPoint(threshold, rule, roc.auc, at["sensitivity"], at["specificity"],
                          at["balanced_accuracy"], at["accuracy"], roc.positives, roc.negatives)


def site_metrics(
    histograms: np.ndarray, threshold: float, *, noise_std: float = 0.0
) -> dict[str, float]:
    """One site's AUC and rates at the federation's threshold, from its own histograms.

    Under DP (`noise_std` > 0) a class the site's noisy counts cannot tell from noise counts
    as absent there (`absent_below`): its rates are NaN, not figures read out of noise.
    """
    return {"auc": roc_from_histograms(histograms, noise_std=noise_std).auc,
            **rates_at(histograms, threshold, noise_std=noise_std)}


def fairness(per_site: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """The worst site and the mean over sites of each metric (NaN where no site defines it)."""
    keys = ("auc", "sensitivity", "specificity", "balanced_accuracy", "accuracy")
    worst, mean = {}, {}
    for key in keys:
        values = [float(m[key]) for m in per_site.values()
                  if m.get(key) is not None and not math.isnan(float(m[key]))]
        worst[key] = min(values) if values else math.nan
        mean[key] = float(np.mean(values)) if values else math.nan
    return {"worst": worst, "mean": mean}


def histogram_calibration(histograms: np.ndarray) -> dict[str, float]:
    """ECE and Brier score estimated from histograms (each bin's scores at its centre).

    For a run without a central test set: an estimate within the bins' resolution, not the
    per-image figure.
    """
    h = np.clip(np.asarray(histograms, dtype=np.float64), 0.0, None)
    centres = 1.0 / (1.0 + np.exp(-np.linspace(-LOGIT_RANGE, LOGIT_RANGE, BINS + 1)))
    p = (centres[:-1] + centres[1:]) / 2
    n = h.sum()
    if n <= 0:
        return {"ece": math.nan, "brier": math.nan}
    brier = float((h[1] * (1 - p) ** 2 + h[0] * p**2).sum() / n)
    which = np.minimum((p * ECE_BINS).astype(int), ECE_BINS - 1)
    ece = 0.0
    for b in range(ECE_BINS):
        sel = which == b
        count = h[:, sel].sum()
        if count > 0:
            ece += abs(h[1, sel].sum() - (p[sel] * h[:, sel].sum(axis=0)).sum()) / n
    return {"ece": float(ece), "brier": brier}


def ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over equal-width bins.

    Two classes: of P(positive) against the positive rate in each bin; more: of the top-label
    confidence against accuracy (Guo et al., 2017).
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if len(labels) == 0:
        return math.nan
    if probs.shape[1] == 2:
        confidence, hit = probs[:, 1], (labels == 1).astype(np.float64)
    else:
        confidence = probs.max(axis=1)
        hit = (probs.argmax(axis=1) == labels).astype(np.float64)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.sum() * abs(hit[sel].mean() - confidence[sel].mean())
    return float(total / len(labels))


def brier(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Brier score: mean (P(positive) - y)^2 for two classes, the multi-class sum otherwise."""
    probs = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return math.nan
    if probs.shape[1] == 2:
        return float(np.mean((probs[:, 1] - (labels == 1)) ** 2))
    onehot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def warnings_for(final: Mapping[str, object], *, floor: float = BALANCED_ACCURACY_FLOOR,
                 where: str = "central test set") -> list[str]:
    """Why the final model is not usable as it stands: one class predicted, or below the floor."""
    def value(key: str) -> float:
        v = final.get(key)
        return float(v) if isinstance(v, int | float) else math.nan

    out: list[str] = []
    sens, spec, bal = value("sensitivity"), value("specificity"), value("balanced_accuracy")
    at = (f"at its operating point (threshold {value('threshold'):.3g})"
          if not math.isnan(value("threshold")) else "at its operating point")
    if sens == 0 or spec == 0:
        called = "negative" if sens == 0 else "positive"
        out.append(
            f"the model calls every image {called} {at} on the {where} (sensitivity "
            f"{sens:.2f}, specificity {spec:.2f}): it detects one class only; train longer, "
            "check the sites' labels and class balance, or set --target-sensitivity"
        )
    if not math.isnan(bal) and bal < floor and not out:
        out.append(
            f"balanced accuracy {bal:.2f} {at} on the {where} is below {floor:g}: the model "
            "barely separates the classes; train longer or check the data before using it"
        )
    return out


def _mean_defined(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan
