"""Segmentation figures: MONAI's arithmetic, medfed's pooling and empty-structure rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric

from common.segmentation import hausdorff95, overlap_metrics, surface_metrics


def _square(size: int, top: int, left: int, side: int, label: int = 1) -> np.ndarray:
    mask = np.zeros((size, size), np.int64)
    mask[top : top + side, left : left + side] = label
    return mask


def test_a_perfect_prediction_scores_dice_1_hd95_0_and_nsd_1():
    truth = np.stack([_square(32, 4, 4, 10), _square(32, 10, 12, 8, 2)])
    scores = overlap_metrics(truth, truth, 3)
    assert scores["dice"] == scores["iou"] == 1.0
    assert scores["dice-c1"] == scores["dice-c2"] == 1.0
    surface = surface_metrics(truth, truth, 3)
    assert surface["hd95"] == 0.0 and surface["nsd"] == 1.0


def test_dice_and_iou_by_hand_on_two_overlapping_squares():
    truth = _square(32, 4, 4, 10)[None]  # 100 pixels
    predicted = _square(32, 4, 9, 10)[None]  # 100 pixels, 50 shared
    scores = overlap_metrics(predicted, truth, 2)
    assert scores["dice"] == pytest.approx(2 * 50 / 200)
    assert scores["iou"] == pytest.approx(50 / 150)


def test_pooled_dice_equals_monais_dice_of_all_images_as_one():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (4, 16, 16))
    predicted = np.where(rng.random((4, 16, 16)) < 0.7, truth, rng.integers(0, 3, (4, 16, 16)))
    scores = overlap_metrics(predicted, truth, 3)
    one_hot = lambda a: torch.nn.functional.one_hot(  # noqa: E731
        torch.as_tensor(a.reshape(1, -1)), 3).movedim(-1, 1).float()
    metric = DiceMetric(include_background=False, reduction="none")
    monai = metric(one_hot(predicted), one_hot(truth))[0]
    assert scores["dice-c1"] == pytest.approx(float(monai[0]))
    assert scores["dice-c2"] == pytest.approx(float(monai[1]))


def test_a_structure_absent_from_prediction_and_truth_is_undefined_not_perfect():
    truth = _square(16, 2, 2, 4)[None]
    scores = overlap_metrics(truth, truth, 3)  # class 2 nowhere
    assert math.isnan(scores["dice-c2"])
    assert scores["dice"] == 1.0  # the mean over the classes that are defined
    missed = overlap_metrics(np.zeros_like(truth), truth, 2)
    assert missed["dice"] == 0.0


def test_hd95_and_nsd_agree_with_monais_metrics_on_shifted_squares():
    truth = _square(40, 10, 10, 12)[None]
    predicted = _square(40, 12, 10, 12)[None]  # two rows lower
    assert hausdorff95(predicted[0] > 0, truth[0] > 0) == pytest.approx(2.0)
    one_hot = lambda a: torch.nn.functional.one_hot(  # noqa: E731
        torch.as_tensor(a), 2).movedim(-1, 1).float()
    hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    nsd = SurfaceDiceMetric([1.0], include_background=False, reduction="none")
    surface = surface_metrics(predicted, truth, 2)
    assert surface["hd95"] == pytest.approx(float(hd(one_hot(predicted), one_hot(truth))[0, 0]))
    assert surface["nsd"] == pytest.approx(float(nsd(one_hot(predicted), one_hot(truth))[0, 0]))
    assert 0 < surface["nsd"] < 1


def test_distances_to_an_empty_mask_are_left_out_not_infinite():
    truth = np.stack([_square(16, 2, 2, 4), np.zeros((16, 16), np.int64)])
    predicted = np.stack([_square(16, 2, 2, 4), _square(16, 8, 8, 3)])  # invented on image 2
    surface = surface_metrics(predicted, truth, 2)
    assert surface["hd95"] == 0.0 and surface["nsd"] == 1.0
    assert math.isnan(hausdorff95(np.zeros((8, 8), bool), np.ones((8, 8), bool)))


def test_volumes_are_scored_like_slices():
    truth = np.zeros((1, 8, 16, 16), np.int64)
    truth[0, 2:6, 4:10, 4:10] = 1
    assert overlap_metrics(truth, truth, 2)["dice"] == 1.0
    assert surface_metrics(truth, truth, 2)["hd95"] == 0.0
