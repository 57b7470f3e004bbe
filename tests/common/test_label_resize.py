"""Label maps resampled by the most-covering class: no blended ids, thin structures kept."""

from __future__ import annotations

import numpy as np

from common.data.normalize import resize


def test_a_thin_line_stays_a_continuous_line_when_downsampled():
    labels = np.zeros((1, 1, 512, 512), np.float32)
    labels[0, 0, 100:102, 40:470] = 1  # two pixels wide: one pixel at 256
    small = resize(labels, 256, labels=True)[0, 0]
    row = small[50, 25:230]
    assert row.min() == 1  # unbroken; nearest-neighbour sampling can miss it entirely
    assert small.sum() < 1.5 * 205


def test_class_ids_are_never_blended_and_a_majority_wins():
    labels = np.zeros((1, 1, 8, 8), np.float32)
    labels[0, 0, :, :4] = 2
    labels[0, 0, :, 4:] = 5
    small = resize(labels, 4, labels=True)[0, 0]
    assert set(np.unique(small)) == {2.0, 5.0}
    assert (small[:, :2] == 2).all() and (small[:, 2:] == 5).all()


def test_upsampling_keeps_every_class_where_it_was():
    labels = np.array([[[[0, 1], [2, 3]]]], np.float32)
    big = resize(labels, 8, labels=True)[0, 0]
    assert big[0, 0] == 0 and big[0, 7] == 1 and big[7, 0] == 2 and big[7, 7] == 3
