"""The aggregator's choice of a binary classifier's operating point, round by round.

After each federated evaluation, the sites' validation-score histograms (common.operating) are
summed into the federated ROC and the threshold is chosen on it (Youden's J, or the highest
threshold reaching --target-sensitivity). That threshold is what the round's central evaluation
reports at, what the next round's sites report their own rates at, and what model.pt carries.
Each site's own AUC and rates at the threshold come from its own histogram: per-site fairness
without another round. Under DP the sites send histograms in the final round only, so the
threshold before then is the default 0.5 (argmax).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord

from common.config import RunConfig
from common.operating import (
    DEFAULT_THRESHOLD,
    HISTOGRAM_NOISE,
    fairness,
    histogram_calibration,
    operating_point,
    site_metrics,
    sum_histograms,
)

log = logging.getLogger("medfed.server")
THRESHOLD_KEY = "threshold"  # the evaluate config's key the sites read it from


@dataclass
class OperatingPoints:
    """The run's current threshold, and the choice made from each round's histograms."""

    target_sensitivity: float = 0.0
    # None until a threshold is chosen (sites then use 0.5); stays None for other tasks
    threshold: float | None = None
    enabled: bool = True
    # the Gaussian noise on each site's counts (DP runs), for per-site metrics
    noise_std: float = 0.0
    chosen: dict[int, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def for_run(cls, cfg: RunConfig, previous: float | None = None) -> OperatingPoints:
        """A binary classifier's tracker (disabled for other tasks); `previous`: on resume."""
        binary = cfg.task == "classify" and cfg.num_classes == 2
        return cls(cfg.target_sensitivity, previous if binary else None, binary,
                   noise_std=HISTOGRAM_NOISE if cfg.dp and not cfg.secure_agg else 0.0)

    @property
    def current(self) -> float | None:
        """The threshold to evaluate at now: the chosen one, else 0.5 (None: not binary)."""
        if not self.enabled:
            return None
        return DEFAULT_THRESHOLD if self.threshold is None else self.threshold

    def config(self, config: ConfigRecord) -> ConfigRecord:
        """The evaluate config with the current threshold (the sites' rates are at it)."""
        if self.threshold is None:
            return config
        return ConfigRecord({**dict(config), THRESHOLD_KEY: float(self.threshold)})

    def choose(self, round_: int, histograms: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
        """Choose the threshold from the sites' histograms of this round; its record entry.

        None (the threshold unchanged) when no site sent histograms or the summed data lack a
        class (no ROC).
        """
        if not self.enabled or not histograms:
            return None
        try:
            summed = sum_histograms(histograms.values())
            point = operating_point(summed, self.target_sensitivity)
        except ValueError as exc:
            log.warning("round %d: operating point not chosen: %s", round_, exc)
            return None
        self.threshold = point.threshold
        sites = {name: site_metrics(h, point.threshold, noise_std=self.noise_std)
                 for name, h in sorted(histograms.items())}
        entry = {**point.to_json(), **histogram_calibration(summed), "sites": sites,
                 "fairness": fairness(sites)}
        self.chosen[round_] = entry
        return entry


def previous_threshold(rounds: list[dict[str, Any]]) -> float | None:
    """The last threshold a run chose (from results.json round entries), for a resume."""
    for entry in reversed(rounds):
        chosen = (entry.get("operating_point") or {}).get("threshold")
        if isinstance(chosen, int | float) and math.isfinite(chosen):
            return float(chosen)
    return None
