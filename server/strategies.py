"""Choose a Flower strategy by name: medfed wraps Flower's strategies, never re-implements them."""

from __future__ import annotations

import math
from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from common.config import RunConfig
from common.privacy import UNIT_WEIGHT
from common.registry import STRATEGIES
from server.scaffold import Scaffold


def nan_safe_weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of each metric over sites, skipping sites where it is undefined (NaN).

    A site whose validation split holds a single class has no AUC; Flower's default average would
    turn the federation's AUC into NaN because of it.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    total = 0.0
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        w = float(metrics[weight_key])  # type: ignore[arg-type]
        total += w
        for key, value in metrics.items():
            if key == weight_key or isinstance(value, list):
                continue
            v = float(value)
            if math.isnan(v):
                continue
            sums[key] = sums.get(key, 0.0) + w * v
            weights[key] = weights.get(key, 0.0) + w
    out: dict[str, Any] = {k: (sums[k] / weights[k] if weights[k] else math.nan) for k in sums}
    out[weight_key] = int(total)
    return MetricRecord(out)


def build_strategy(cfg: RunConfig, *, num_sites: int | None = None) -> Strategy:
    """The Flower strategy called `cfg.strategy`, configured from the run.

    Args:
        num_sites: sites known to exist (simulation); caps the minimums so a small
            federation is not left waiting for sites that will never come.

    """
    min_sites = cfg.min_sites if num_sites is None else min(cfg.min_sites, num_sites)
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": min_sites,
        "min_evaluate_nodes": min_sites if cfg.fraction_evaluate > 0 else 0,
        "min_available_nodes": min_sites,
        "train_metrics_aggr_fn": nan_safe_weighted_mean,
        "evaluate_metrics_aggr_fn": nan_safe_weighted_mean,
    }
    if cfg.central_dp != "off":
        # central DP's sensitivity holds for a mean in which every site weighs the same
        common["weighted_by_key"] = UNIT_WEIGHT
    name = cfg.strategy
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    if name == "fedadam":
        return FedAdam(**common, eta=cfg.server_lr, eta_l=cfg.lr)
    if name == "fedyogi":
        return FedYogi(**common, eta=cfg.server_lr, eta_l=cfg.lr)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=cfg.trimmed_beta)
    if name == "scaffold":
        return Scaffold(**common)
    if name == "krum":
        return Krum(**common, num_malicious_nodes=cfg.krum_byzantine)
    raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")
