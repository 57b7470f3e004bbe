"""Pure helpers of the bench's hard-scenario and real-data workloads (bench/run.py runs them).

What a run reached is read from its results.json `final` as it is: the operating point's keys
(`sensitivity`, `specificity`, `balanced_accuracy`, `threshold`, ...) are taken when the run
wrote them, and balanced accuracy is worked out from sensitivity and specificity when it did not.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# `medfed synth` arguments of simulations/scenarios/hard.toml's data (the file's comment)
HARD_SYNTH: dict[str, Any] = {
    "sites": 5, "site_sizes": [900, 300, 400, 60, 30], "one_class_sites": 3,
    "label_alpha": 0.5, "test_prevalence": 0.2, "test_images": 400, "seed": 0,
}
# BreastMNIST hospitals from ../shared/data/make_sites.py: the shape of the real check (three
# one-class sites, two of them tiny, beside one mixed) and the script's default layout
BREASTMNIST_LAYOUTS: dict[str, list[str]] = {
    "hard": ["--sites", "4", "--alpha", "1.0", "--one-class-sites", "3"],
    "default": [],
}
# the real check's floor at the operating point (issue 16: sensitivity and specificity >= 0.80)
BALANCED_ACCURACY_GOAL = 0.80
# where the shared development data lives, relative to the repository root
DEV_DATA = Path("..") / "shared" / "data"
DEV_DATA_ENV = "MEDFED_DEV_DATA"  # overrides it (e.g. a worktree that has no ../shared)
# `final` keys the bench reports when a run wrote them
POINT_KEYS = ("auc", "sensitivity", "specificity", "balanced_accuracy", "accuracy", "threshold",
              "ece", "brier", "loss")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def operating_point(final: Mapping[str, Any]) -> dict[str, float]:
    """The run's figures at its operating point, from results.json `final`.

    `balanced_accuracy` is the run's own when it wrote one, else (sensitivity + specificity) / 2
    (NaN when either is missing). Keys the run did not write are NaN.
    """
    point = {key: _number(final.get(key)) for key in POINT_KEYS}
    if not math.isfinite(point["balanced_accuracy"]):
        point["balanced_accuracy"] = (point["sensitivity"] + point["specificity"]) / 2
    return point


def fl_steps(results: Mapping[str, Any]) -> int:
    """Optimiser steps every site took in every round of a run (results.json `rounds`)."""
    total = 0
    for entry in results.get("rounds", []):
        for site in (entry.get("federated") or {}).get("sites", {}).values():
            total += int((site.get("train") or {}).get("steps", 0))
    return total


def epsilon_max(results: Mapping[str, Any]) -> float:
    """The largest epsilon any site spent (NaN for a run without DP)."""
    spent = [_number(site.get("epsilon")) for site in (results.get("privacy") or {}).values()]
    finite = [e for e in spent if math.isfinite(e)]
    return max(finite) if finite else math.nan


def labelled_train_rows(sites_dir: Path) -> int:
    """Labelled training rows over every site folder (what central training pools)."""
    total = 0
    for labels in sorted(Path(sites_dir).glob("*/labels.csv")):
        with labels.open(newline="") as fh:
            total += sum(row["split"] == "train" and row["label"] != ""
                         for row in csv.DictReader(fh))
    return total


def central_epochs(steps: int, train_rows: int, batch_size: int) -> int:
    """Epochs of central training that take about `steps` optimiser steps (at least one)."""
    per_epoch = max(1, math.ceil(train_rows / batch_size))
    return max(1, round(steps / per_epoch))


def dev_data(root: Path) -> Path | None:
    """The shared development data (with make_sites.py), or None when it is not there."""
    where = os.environ.get(DEV_DATA_ENV)
    folder = Path(where) if where else (root / DEV_DATA).resolve()
    return folder if (folder / "make_sites.py").is_file() else None
