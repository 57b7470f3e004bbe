"""The operating point from sites' score histograms equals what pooled per-image scores give."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.metrics import classification_metrics
from common.operating import (
    BINS,
    HISTOGRAM_NOISE,
    THRESHOLDS,
    absent_below,
    bin_index,
    brier,
    choose_threshold,
    ece,
    operating_point,
    roc_from_histograms,
    roc_from_scores,
    score_histograms,
    site_metrics,
    sum_histograms,
    warnings_for,
)


def _sites(seed: int, sizes=(30, 70, 150, 12), separation: float = 2.5):
    """Per-site (scores, labels): logistic scores, site-specific prevalence, some on edges."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(sizes):
        labels = (rng.random(n) < (0.2 + 0.2 * i)).astype(int)
        logits = rng.normal(0.0, 1.5, n) + separation * (labels - 0.5)
        scores = 1.0 / (1.0 + np.exp(-logits))
        scores[:3] = THRESHOLDS[rng.integers(0, BINS - 1, 3)]  # exactly on bin edges
        scores[3] = 0.0 if n > 3 else scores[3]
        out.append((scores, labels))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_federated_roc_from_summed_histograms_equals_pooled_roc(seed: int) -> None:
    sites = _sites(seed)
    summed = sum_histograms(score_histograms(s, y) for s, y in sites)
    scores = np.concatenate([s for s, _ in sites])
    labels = np.concatenate([y for _, y in sites])
    federated, pooled = roc_from_histograms(summed), roc_from_scores(scores, labels)
    # at every bin edge, exactly (the counts are integers: no rounding anywhere)
    np.testing.assert_array_equal(federated.thresholds, pooled.thresholds)
    np.testing.assert_array_equal(federated.sensitivity, pooled.sensitivity)
    np.testing.assert_array_equal(federated.specificity, pooled.specificity)
    # the trapezoid AUC is the Mann-Whitney AUC of the binned scores (ties count half) ...
    binned = roc_auc_score(labels, bin_index(scores))
    assert federated.auc == pytest.approx(binned, abs=1e-12)
    # ... and the pooled per-image AUC within the bins' resolution
    assert federated.auc == pytest.approx(roc_auc_score(labels, scores), abs=0.01)


def test_chosen_threshold_reaches_target_sensitivity_on_validation_data() -> None:
    sites = _sites(7)
    scores = np.concatenate([s for s, _ in sites])
    labels = np.concatenate([y for _, y in sites])
    summed = sum_histograms(score_histograms(s, y) for s, y in sites)
    for target in (0.8, 0.9, 0.95, 0.99):
        point = operating_point(summed, target)
        reached = float(np.mean(scores[labels == 1] >= point.threshold))
        assert reached >= target
        assert point.sensitivity == reached
        # and it is the highest such threshold: the next edge up falls short of the target
        higher = THRESHOLDS[THRESHOLDS > point.threshold]
        if len(higher):
            assert float(np.mean(scores[labels == 1] >= higher[0])) < target
        # the sites' own scalar rates at it agree with the federation's
        probs = np.stack([1 - scores, scores], axis=1)
        at = classification_metrics(probs, labels, threshold=point.threshold)
        assert at["sensitivity"] == pytest.approx(point.sensitivity)
        assert at["specificity"] == pytest.approx(point.specificity)
        assert at["accuracy"] == pytest.approx(point.accuracy)


def test_youden_picks_the_j_maximum() -> None:
    sites = _sites(3, separation=1.5)
    scores = np.concatenate([s for s, _ in sites])
    labels = np.concatenate([y for _, y in sites])
    point = operating_point(sum_histograms(score_histograms(s, y) for s, y in sites))
    j = [np.mean(scores[labels == 1] >= t) + np.mean(scores[labels == 0] < t) - 1
         for t in THRESHOLDS]
    assert point.sensitivity + point.specificity - 1 == pytest.approx(max(j))
    assert point.rule == "youden"


def test_youden_on_a_plateau_takes_its_middle() -> None:
    # perfectly separated: J = 1 on every edge between the classes
    neg, pos = np.full(10, THRESHOLDS[5] - 1e-9), np.full(10, THRESHOLDS[20] + 1e-9)
    h = score_histograms(np.concatenate([neg, pos]), np.repeat([0, 1], 10))
    roc = roc_from_histograms(h)
    j = choose_threshold(roc)
    assert roc.sensitivity[j] == 1 and roc.specificity[j] == 1
    assert 6 < j < 21 and abs(j - 13.5) <= 1


@pytest.mark.parametrize("sigma", [1.0, 2.0, 5.0, 20.0])
def test_noisy_histograms_give_a_monotone_roc_in_the_unit_square(sigma: float) -> None:
    rng = np.random.default_rng(int(sigma))
    for _ in range(50):
        sites = _sites(int(rng.integers(1_000_000)), sizes=(15, 20))
        noisy = sum_histograms(score_histograms(s, y) + rng.normal(0, sigma, (2, BINS))
                               for s, y in sites)
        assert (noisy < 0).any() or sigma < 5  # the noise does make counts negative
        roc = roc_from_histograms(noisy)
        if math.isnan(roc.auc):  # noise drowned a class: no ROC, said so
            with pytest.raises(ValueError, match="one class are not positive"):
                choose_threshold(roc)
            continue
        for rates in (roc.sensitivity, roc.specificity):
            assert ((rates >= 0) & (rates <= 1)).all()
        assert (np.diff(roc.sensitivity) <= 0).all()
        assert (np.diff(roc.specificity) >= 0).all()
        assert roc.sensitivity[0] == 1 and roc.specificity[-1] == 1
        assert 0 <= roc.auc <= 1


def test_a_class_absent_everywhere_has_no_operating_point() -> None:
    h = score_histograms(np.array([0.2, 0.7, 0.9]), np.array([1, 1, 1]))
    assert math.isnan(roc_from_histograms(h).auc)
    with pytest.raises(ValueError):
        operating_point(h)


def test_histograms_have_the_declared_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        sum_histograms([np.zeros((2, BINS + 1))])
    with pytest.raises(ValueError):
        score_histograms(np.zeros(3), np.zeros(4))


def test_per_site_metrics_from_its_own_histogram() -> None:
    scores, labels = _sites(11)[2]
    h = score_histograms(scores, labels)
    t = float(THRESHOLDS[24])
    m = site_metrics(h, t)
    assert m["sensitivity"] == np.mean(scores[labels == 1] >= t)
    assert m["specificity"] == np.mean(scores[labels == 0] < t)
    assert m["balanced_accuracy"] == pytest.approx((m["sensitivity"] + m["specificity"]) / 2)


def test_ece_and_brier() -> None:
    # a perfectly calibrated, confident model, and a confidently wrong one
    labels = np.array([0, 1, 0, 1])
    right = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert ece(right, labels) == 0 and brier(right, labels) == 0
    wrong = right[:, ::-1]
    assert ece(wrong, labels) == pytest.approx(1.0) and brier(wrong, labels) == 1.0
    # P(positive) 0.7 on every image, 70% positive: calibrated, Brier = p(1-p)
    labels = np.array([1] * 7 + [0] * 3)
    probs = np.tile([0.3, 0.7], (10, 1))
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert brier(probs, labels) == pytest.approx(0.21)
    # multi-class: the sum over classes
    probs3 = np.array([[0.5, 0.25, 0.25]])
    assert brier(probs3, np.array([0])) == pytest.approx(0.375)


def test_a_one_class_model_is_flagged() -> None:
    labels = np.array([0] * 40 + [1] * 60)
    everyone_sick = np.tile([0.1, 0.9], (100, 1))
    final = {**classification_metrics(everyone_sick, labels, threshold=0.5), "threshold": 0.5}
    assert final["sensitivity"] == 1 and final["specificity"] == 0
    (warning,) = warnings_for(final)
    assert "every image positive" in warning
    # a usable model is not
    good = np.stack([1 - labels * 0.8 - 0.1, labels * 0.8 + 0.1], axis=1)
    assert warnings_for(classification_metrics(good, labels)) == []
    # above chance on both classes but below the floor
    weak = {"sensitivity": 0.6, "specificity": 0.5, "balanced_accuracy": 0.55}
    assert "below 0.6" in warnings_for(weak)[0]


def test_multiclass_metrics_have_balanced_accuracy_and_no_threshold() -> None:
    labels = np.repeat([0, 1, 2], 10)
    probs = np.full((30, 3), 0.1)
    probs[np.arange(30), labels] = 0.8
    probs[:5] = [0.1, 0.1, 0.8]  # five of class 0 called class 2
    m = classification_metrics(probs, labels)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert "threshold" not in m


def test_under_dp_a_one_class_site_reports_no_figures_for_the_class_it_lacks() -> None:
    # A site of 300 negatives and no positive, its histograms noised as a DP run releases them:
    # the absent class's noisy total is positive about half the time, and was then read as
    # that class's sensitivity (the fairness table's "worst site").
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.0, 0.4, 300)
    clean = score_histograms(scores, np.zeros(300, dtype=int))
    read_from_noise = 0
    for _ in range(200):
        noisy = clean + rng.normal(0.0, HISTOGRAM_NOISE, clean.shape)
        if not math.isnan(site_metrics(noisy, 0.5)["sensitivity"]):
            read_from_noise += 1
        m = site_metrics(noisy, 0.5, noise_std=HISTOGRAM_NOISE)
        assert math.isnan(m["sensitivity"]) and math.isnan(m["auc"])
        assert m["specificity"] > 0.75  # the class the site holds is still measured
    assert read_from_noise > 50  # without the noise floor, noise passed for positives
    assert absent_below(0.0) == 0.5  # without DP: any image counts
