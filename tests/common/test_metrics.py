import math

import numpy as np
import pytest

from common.metrics import classification_metrics


def test_binary_metrics() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 0])
    m = classification_metrics(probs, labels)
    assert m["accuracy"] == 0.5
    assert m["sensitivity"] == 0.5  # one of two positives predicted
    assert m["specificity"] == 0.5
    assert m["auc"] == pytest.approx(0.75)


def test_auc_undefined_with_one_class_is_nan() -> None:
    m = classification_metrics(np.array([[0.4, 0.6], [0.3, 0.7]]), np.array([1, 1]))
    assert math.isnan(m["auc"])
    assert math.isnan(m["specificity"])
    assert m["sensitivity"] == 1.0


def test_multiclass_auc() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 10)
    probs = np.eye(3)[labels] * 0.8 + rng.random((30, 3)) * 0.1
    probs /= probs.sum(1, keepdims=True)
    assert classification_metrics(probs, labels)["auc"] == pytest.approx(1.0)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        classification_metrics(np.zeros((3, 2)), np.zeros(2))
