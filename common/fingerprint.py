"""A site's segmentation data fingerprint, as it travels: aggregates only (client.fingerprint).

The dataclass and its wire form are shared by the site that measures it and the aggregator that
plans from it (common.seg_plan); nothing here reads data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FINGERPRINT = "fingerprint"  # the query's action: message type "query.fingerprint"
PREFIX = "fp-"
SCALAR_KEYS = (
    "fp-train-images", "fp-val-images", "fp-rows", "fp-cols", "fp-slices", "fp-spacing-row",
    "fp-spacing-col", "fp-max-label", "fp-shares-noise",
)
LIST_KEYS = ("fp-class-shares",)


@dataclass(frozen=True)
class Fingerprint:
    """One site's aggregates (see the module's docstring). NaN: not known (no spacing)."""

    train_images: int
    val_images: int
    rows: float
    cols: float
    slices: float
    spacing_row: float
    spacing_col: float
    max_label: int
    # summed class fractions per label 0..max_label (noisy under DP)
    class_shares: tuple[float, ...]
    # the Gaussian noise's standard deviation on each share (0: exact)
    shares_noise: float = 0.0

    def to_metrics(self) -> dict[str, float | list[float]]:
        """MetricRecord values (fp-* keys), as the reply carries them."""
        return {
            "fp-train-images": float(self.train_images), "fp-val-images": float(self.val_images),
            "fp-rows": self.rows, "fp-cols": self.cols, "fp-slices": self.slices,
            "fp-spacing-row": self.spacing_row, "fp-spacing-col": self.spacing_col,
            "fp-max-label": float(self.max_label), "fp-shares-noise": self.shares_noise,
            "fp-class-shares": [float(v) for v in self.class_shares],
        }

    @classmethod
    def from_metrics(cls, values: dict[str, object]) -> Fingerprint:
        """Parse a reply's fp-* metrics; ValueError names a missing or malformed key."""

        def number(key: str) -> float:
            value = values.get(key)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"fingerprint reply lacks a number for {key!r}")
            return float(value)

        shares = values.get("fp-class-shares")
        if not isinstance(shares, list) or not all(isinstance(v, int | float) for v in shares):
            raise ValueError("fingerprint reply lacks the list 'fp-class-shares'")
        max_label = int(number("fp-max-label"))
        if len(shares) != max_label + 1:
            raise ValueError(
                f"fingerprint reply has {len(shares)} class shares for labels 0..{max_label}"
            )
        return cls(
            train_images=int(number("fp-train-images")), val_images=int(number("fp-val-images")),
            rows=number("fp-rows"), cols=number("fp-cols"), slices=number("fp-slices"),
            spacing_row=number("fp-spacing-row"), spacing_col=number("fp-spacing-col"),
            max_label=max_label, class_shares=tuple(float(v) for v in shares),
            shares_noise=number("fp-shares-noise"),
        )

    def to_json(self) -> dict[str, object]:
        """Plain values for results.json (NaN as None)."""
        metrics = self.to_metrics()
        return {k[len(PREFIX):]: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in metrics.items()}
