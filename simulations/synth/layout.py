"""How the synthetic images are laid out.

The hard-layout arguments (checked: errors name the CLI flag) and each site's train/val/test
splits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SITE_SPLITS = (("train", 0.70), ("val", 0.15), ("test", 0.15))


MIN_IMAGES = 10


@dataclass(frozen=True)
class _Layout:
    """The hard-layout arguments, checked: what each site holds and the test set's lesions."""

    sizes: tuple[int, ...] | None
    one_class: tuple[int | None, ...]  # per site: None (both classes) or its only class
    label_alpha: float | None
    test_positives: int


def _hard_layout(
    sites: int, site_sizes: Sequence[int] | None, one_class_sites: int,
    label_alpha: float | None, test_prevalence: float | None, n_test: int,
) -> _Layout:
    """Check the hard-layout arguments (errors name the CLI flag) and resolve them."""
    sizes = None
    if site_sizes is not None:
        sizes = tuple(int(n) for n in site_sizes)
        if len(sizes) != sites:
            raise ValueError(
                f"--site-sizes gives {len(sizes)} sizes but --sites is {sites}; give one size "
                "per site (e.g. --site-sizes 30,80,600,1500 for 4 sites)"
            )
        small = [n for n in sizes if n < MIN_IMAGES]
        if small:
            raise ValueError(
                f"--site-sizes must all be >= {MIN_IMAGES} (a site needs train, val and test "
                f"images), got {small[0]}"
            )
    if not 0 <= one_class_sites <= sites:
        raise ValueError(
            f"--one-class-sites must be between 0 and --sites ({sites}), got {one_class_sites}"
        )
    if one_class_sites == sites == 1:
        raise ValueError(
            "--one-class-sites 1 with --sites 1 leaves the federation one class; use --sites >= 2"
        )
    if label_alpha is not None and not (math.isfinite(label_alpha) and label_alpha > 0):
        raise ValueError(
            f"--label-alpha must be > 0 (small: more skew, e.g. 0.5), got {label_alpha:g}"
        )
    n_pos = n_test // 2
    if test_prevalence is not None:
        if not 0 < test_prevalence < 1:
            raise ValueError(
                f"--test-prevalence must be in (0, 1) (the test set needs both classes), got "
                f"{test_prevalence:g}"
            )
        # both classes in the test set, or its AUC is undefined
        n_pos = min(n_test - 1, max(1, round(test_prevalence * n_test)))
    one_class: list[int | None] = [None] * (sites - one_class_sites)
    one_class += [k % 2 for k in range(one_class_sites)]  # normal, lesion, normal, ...
    return _Layout(sizes, tuple(one_class), label_alpha, n_pos)


def _stratified_splits(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Assign train/val/test ~ 70/15/15 within each class, so val and test hold both."""
    splits = [""] * len(labels)
    for cls in (False, True):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_train = round(SITE_SPLITS[0][1] * idx.size)
        n_val = round(SITE_SPLITS[1][1] * idx.size)
        for k, i in enumerate(idx):
            splits[i] = "train" if k < n_train else "val" if k < n_train + n_val else "test"
    return splits
