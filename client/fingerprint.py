"""A site's segmentation data fingerprint: the aggregates the aggregator plans a run from.

nnU-Net plans its network from a dataset fingerprint computed where the data is; here every
site computes its own, and only these aggregates leave it (through the outbound guard and the
audit trail, like every reply):

- how many training and validation images have a mask;
- the median stored size (rows, columns, slices) and pixel spacing of those images;
- the largest label value in the masks (the annotation protocol: which structures are drawn);
- each class's share of the pixels, summed over images (one image adds its class fractions,
  a vector of L2 norm at most 1). Under DP the shares come from the validation split only,
  with Gaussian noise, released once per run and accounted with that split's other releases
  (client.validation); the training images stay DP-SGD's alone.

Nothing per image, no header value other than sizes and spacings, no identifier.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from client import validation
from common.config import RunConfig
from common.data import SiteData
from common.fingerprint import Fingerprint
from common.sites import SiteRef

# the validation release of the class shares, and its Gaussian noise multiplier (L2
# sensitivity 1: one image moves the vector by its class fractions)
CLASS_SHARES = "class-shares"
CLASS_SHARES_NOISE = 3.0


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.median(finite)) if finite else math.nan


def measure(data: SiteData) -> tuple[Fingerprint, np.ndarray, np.ndarray]:
    """The site's exact fingerprint, and its train and val summed class fractions apart.

    The shares in the Fingerprint are train + val; the caller replaces them with a noisy
    validation release under DP.
    """
    sizes: list[tuple[float, float, float]] = []
    spacings: list[tuple[float, float]] = []
    fractions: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    max_label = 0
    for split in ("train", "val"):
        for loaded in data.iter_rows(split):
            if loaded.mask is None:
                continue
            meta = loaded.image.meta
            sizes.append((meta.rows, meta.cols, meta.slices))
            if meta.pixel_spacing is not None:
                spacings.append(meta.pixel_spacing)
            counts = np.bincount(np.asarray(loaded.mask, dtype=np.int64).ravel())
            max_label = max(max_label, len(counts) - 1)
            fractions[split].append(counts / max(int(counts.sum()), 1))
    summed = {}
    for split, rows in fractions.items():
        total = np.zeros(max_label + 1)
        for row in rows:
            total[: len(row)] += row
        summed[split] = total
    fingerprint = Fingerprint(
        train_images=len(fractions["train"]), val_images=len(fractions["val"]),
        rows=_median([s[0] for s in sizes]), cols=_median([s[1] for s in sizes]),
        slices=_median([s[2] for s in sizes]),
        spacing_row=_median([s[0] for s in spacings]),
        spacing_col=_median([s[1] for s in spacings]),
        max_label=max_label, class_shares=tuple(summed["train"] + summed["val"]),
    )
    return fingerprint, summed["train"], summed["val"]


def site_fingerprint(
    data: SiteData, site: SiteRef, cfg: RunConfig, run_key: str, *, budget: float | None,
    ledger_dir: Path | None,
) -> Fingerprint:
    """What leaves the site: the exact fingerprint without DP.

    Under DP the shares are the validation split's, noised once per run; a budget that refuses
    the release leaves them all NaN.
    """
    exact, _, val_shares = measure(data)
    if not cfg.dp:
        return exact
    releases = {CLASS_SHARES: CLASS_SHARES_NOISE}
    made = validation.release(site, cfg, run_key, releases, CLASS_SHARES, val_shares,
                              budget=budget, ledger_dir=ledger_dir)
    if made is None:
        shares = np.full(len(val_shares), math.nan)
        noise = math.nan
    else:
        shares = made[0]
        noise = validation.released_noise(site, run_key, CLASS_SHARES)
    return dataclasses.replace(exact, class_shares=tuple(float(v) for v in shares),
                               shares_noise=noise)
