"""How a segmentation run is sized when the user leaves it to medfed (nnU-Net's idea, federated).

Pure arithmetic on aggregates, no torch and no Flower: the aggregator calls it on the sites'
fingerprints (server.fingerprint), and any process rebuilding the run's network calls
`planned_shape` with the run's settings and gets the same answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from common.fingerprint import Fingerprint

if TYPE_CHECKING:
    from common.config import RunConfig

# The deepest level of the U-Net sees image_size / 2**depth pixels: 8 without DP (nnU-Net pools
# to 4-8); under DP-SGD, whose noise grows with the parameter count, 16 (two levels at 64 px,
# 30k parameters at width 8, where three levels have 121k), but never fewer than two levels
# (one level at 32 px left phantom nodules at Dice 0.00 under DP, where two reach 0.8).
_MIN_BOTTOM = 8
_MIN_BOTTOM_DP = 16
_MIN_LEVELS = 2
_MAX_DEPTH = 5
# First-level channels. Every level costs about the same arithmetic per image (half the pixels,
# twice the channels), and width 16 costs four times width 8 at every level: on a site's CPU a
# width-16, four-level U-Net at 64 px took several seconds per step, the run hours.
WIDTH = 8


# A step's batch holds about this many pixels (16 images of 64 x 64), so that a step's arithmetic
# on a site's CPU stays the same at any image size; never fewer than 4 images. 16 at 64 px: on
# sites of 35 to 77 lung radiographs, 64 (a whole site per step) took four times as long a step
# and under DP-SGD samples every image every step, which leaves no amplification by sampling.
_BATCH_PIXELS = 16 * 64 * 64
_MIN_BATCH = 4
_MAX_BATCH = 64


def planned_batch(image_size: int, dims: int = 2) -> int:
    """Images per step for segmentation at `image_size` (volumes: image_size**3 voxels each)."""
    return max(_MIN_BATCH, min(_MAX_BATCH, _BATCH_PIXELS // image_size**dims))


def planned_shape(image_size: int, *, dp: bool) -> tuple[int, int]:
    """(width, depth) of the U-Net for `image_size` inputs, with or without DP-SGD."""
    def deepest(bottom: int) -> int:
        depth = 1
        while (
            depth < _MAX_DEPTH
            and image_size % 2 ** (depth + 1) == 0
            and image_size // 2 ** (depth + 1) >= bottom
        ):
            depth += 1
        return depth

    two_levels = min(_MIN_LEVELS, deepest(4))  # where the image allows a 4-pixel bottom
    return WIDTH, max(deepest(_MIN_BOTTOM_DP if dp else _MIN_BOTTOM), two_levels)


# --dims 3: a volume up to this edge trains whole (a 64-voxel cube of a width-16 U-Net fits a
# CPU's memory at a small batch); a larger one trains on patches of half its edge, which still
# see a structure with context (nnU-Net's 3D patches are a fraction of the median volume).
WHOLE_VOLUME_MAX = 64
# a planned patch is a multiple of this, so that a U-Net of depth up to 4 halves it evenly
_PATCH_MULTIPLE = 16


def planned_patch(image_size: int) -> int:
    """The training patch's edge for --image-size cubes: the whole volume up to 64 voxels."""
    if image_size <= WHOLE_VOLUME_MAX:
        return image_size
    return max(_PATCH_MULTIPLE, image_size // 2 // _PATCH_MULTIPLE * _PATCH_MULTIPLE)


def pooled_shares(fingerprints: Mapping[str, Fingerprint]) -> list[float] | None:
    """Each label's share of the federation's pixels (background first).

    From the sites' summed class fractions; None when no site's shares are usable. A noisy
    share below zero counts 0.
    """
    length = max((fp.max_label + 1 for fp in fingerprints.values()), default=0)
    total = [0.0] * length
    for fp in fingerprints.values():
        if any(math.isnan(v) for v in fp.class_shares):
            continue
        for label, value in enumerate(fp.class_shares):
            total[label] += max(value, 0.0)
    mass = sum(total)
    return [v / mass for v in total] if mass > 0 else None


# No class starts below this share (the 1% start phantom nodules were tuned with). A share the
# noise of a small site's DP release buried near zero would otherwise start its class at almost
# nothing, which Adam's small steps take hundreds of steps to undo: on MSD hippocampus under DP
# a 0.1% floor left the anterior class at Dice 0.00.
_PRIOR_FLOOR = 0.01


def class_prior(shares: list[float] | None, num_classes: int) -> list[float] | None:
    """The output layer's starting class shares: the pooled shares, floored and renormalised."""
    if shares is None:
        return None
    padded = [*shares, *([0.0] * max(0, num_classes - len(shares)))][:num_classes]
    floored = [max(v, _PRIOR_FLOOR) for v in padded]
    total = sum(floored)
    return [v / total for v in floored]


def plan_run(
    cfg: RunConfig, fingerprints: Mapping[str, Fingerprint]
) -> tuple[RunConfig, dict[str, Any]]:
    """The run's settings after the sites' fingerprints, and the plan as results.json shows it.

    The planner only decides what the data decides: it raises --num-classes to cover every
    label a site's masks hold (fewer classes could not train on them), starts the output layer
    at the pooled class shares (`class-prior`, the focal-loss prior initialisation, from the
    data instead of a guess), and sizes the U-Net from the image size where --net-width and
    --net-depth are left at 0 (`planned_shape`).
    """
    labels = max((fp.max_label for fp in fingerprints.values()), default=0)
    choices: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    planned = cfg
    if labels + 1 > cfg.num_classes:
        planned = planned.replace(num_classes=labels + 1)
        choices["num-classes"] = labels + 1
        reasons["num-classes"] = (
            f"the masks hold labels up to {labels}; --num-classes {cfg.num_classes} could not "
            "train on them"
        )
    size = planned.network_size()
    width, depth = planned_shape(size, dp=planned.dp)
    choices["net-width"] = planned.net_width or width
    choices["net-depth"] = planned.net_depth or depth
    reasons["net-width"] = "given" if planned.net_width else (
        "every level's arithmetic grows with the square of the width (a site's CPU)"
    )
    reasons["net-depth"] = "given" if planned.net_depth else (
        f"pool {size} px down to {size // 2**depth} px"
    )
    if planned.dims == 3:
        choices["patch-size"] = size
        reasons["patch-size"] = "given" if planned.patch_size else (
            "the whole volume" if size == planned.image_size
            else f"half the {planned.image_size}-voxel volume"
        )
    sizes = [fp.train_images for fp in fingerprints.values()]
    shares = pooled_shares(fingerprints)
    pooled: dict[str, Any] = {
        "sites": len(fingerprints),
        "train-images": sum(sizes),
        "smallest-site": min(sizes, default=0),
        "largest-site": max(sizes, default=0),
        "median-rows": _median([fp.rows for fp in fingerprints.values()]),
        "median-cols": _median([fp.cols for fp in fingerprints.values()]),
        "median-slices": _median([fp.slices for fp in fingerprints.values()]),
        "median-spacing-mm": _median(
            [v for fp in fingerprints.values() for v in (fp.spacing_row, fp.spacing_col)]
        ),
        "class-shares": shares,
    }
    prior = class_prior(shares, planned.num_classes)
    if prior is not None:
        choices["class-prior"] = prior
        reasons["class-prior"] = "the sites' pooled class shares" + (
            " (noisy validation releases under DP)" if planned.dp else "")
    plan = {
        "fingerprints": {name: fp.to_json() for name, fp in sorted(fingerprints.items())},
        "pooled": pooled,
        "choices": choices,
        "reasons": reasons,
    }
    return planned, plan


def _median(values: list[float]) -> float | None:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return None
    middle = len(finite) // 2
    return finite[middle] if len(finite) % 2 else (finite[middle - 1] + finite[middle]) / 2
