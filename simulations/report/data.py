"""Reading a run's results.json, and the numbers the report draws from it (no HTML here)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# participation codes: what a site did in a round's training stage
ABSENT, TRAINED, FAILED, REFUSED, SCREENED = 0, 1, 2, 3, 4


class ReportError(ValueError):
    """The run folder cannot be reported on; the message names the path and the fix."""


def load_results(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/results.json, checked enough that the report can rely on its shape."""
    if not run_dir.exists():
        raise ReportError(
            f"{run_dir}: no such folder; pass the --out folder of a `medfed simulate` run"
        )
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a folder; pass the run folder, not a file in it")
    path = run_dir / "results.json"
    if not path.is_file():
        raise ReportError(
            f"{run_dir}: not a run folder (no results.json); pass the --out folder of a "
            "`medfed simulate` run, which writes results.json before its first round"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(
            f"{path}: not valid JSON ({exc}); the file is damaged: re-run the simulation, or "
            f"resume it with `medfed simulate --resume {run_dir}` to rewrite it"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or not isinstance(
        data.get("rounds"), list
    ):
        raise ReportError(
            f"{path}: not a medfed results file (expected an object with 'config' and "
            "'rounds'); pass the --out folder of a `medfed simulate` run"
        )
    for i, entry in enumerate(data["rounds"]):
        if not isinstance(entry, dict) or "round" not in entry:
            raise ReportError(
                f"{path}: round entry {i} is malformed (no 'round'); the file is damaged: "
                "re-run the simulation"
            )
    return data


def finite(value: Any) -> float | None:
    """A finite number as float; None for anything else (bools, strings, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _fed_sites(entry: dict[str, Any]) -> dict[str, Any]:
    return ((entry.get("federated") or {}).get("sites")) or {}


def site_names(results: dict[str, Any]) -> list[str]:
    """Every site the run heard of: trained, evaluated, failed, or spent privacy."""
    names: set[str] = set(results.get("privacy") or {})
    for entry in results["rounds"]:
        names.update(_fed_sites(entry))
        names.update(entry.get("participants") or [])
        names.update(entry.get("update_bytes") or {})
        names.update(f["site"] for f in entry.get("failures") or [] if f.get("site") != "*")
    return sorted(names)


def participation_matrix(results: dict[str, Any], sites: Sequence[str]) -> np.ndarray:
    """Codes (sites x rounds) of what each site did in each round's training stage."""
    index = {name: i for i, name in enumerate(sites)}
    grid = np.full((len(sites), len(results["rounds"])), ABSENT, dtype=np.int8)
    for col, entry in enumerate(results["rounds"]):
        for name in entry.get("participants") or []:
            if name in index:
                grid[index[name], col] = TRAINED
        for failure in entry.get("failures") or []:
            row = index.get(failure.get("site", ""))
            if row is None or failure.get("stage") != "train":
                continue
            kind = str(failure.get("kind", ""))
            grid[row, col] = (
                REFUSED if kind == "refused"
                else SCREENED if kind.startswith("screened")
                else FAILED
            )
    return grid


def site_metric(results: dict[str, Any], sites: Sequence[str], stage: str, key: str) -> np.ndarray:
    """(sites x rounds) of a per-site metric (`stage` train or evaluate); NaN where absent."""
    index = {name: i for i, name in enumerate(sites)}
    values = np.full((len(sites), len(results["rounds"])), np.nan)
    for col, entry in enumerate(results["rounds"]):
        for name, report in _fed_sites(entry).items():
            value = finite(((report or {}).get(stage) or {}).get(key))
            if value is not None and name in index:
                values[index[name], col] = value
    return values


def fairness_by_round(results: dict[str, Any], metric: str = "auc") -> list[dict[str, Any]]:
    """Per round: worst site's, mean, median and best site's federated `metric` (validation)."""
    rows = []
    for entry in results["rounds"]:
        per_site = {
            name: v
            for name, report in _fed_sites(entry).items()
            if (v := finite(((report or {}).get("evaluate") or {}).get(metric))) is not None
        }
        if not per_site:
            continue
        values = np.array(list(per_site.values()))
        worst = min(per_site, key=per_site.__getitem__)
        rows.append(
            {
                "round": entry["round"],
                "sites": len(values),
                "worst_site": worst,
                "worst": float(values.min()),
                "p10": float(np.percentile(values, 10)),
                "median": float(np.median(values)),
                "mean": float(values.mean()),
                "best": float(values.max()),
                "gap": float(values.mean() - values.min()),
            }
        )
    return rows


def epsilon_matrix(results: dict[str, Any], sites: Sequence[str]) -> np.ndarray:
    """(sites x rounds) cumulative epsilon, carried forward over rounds a site sat out."""
    index = {name: i for i, name in enumerate(sites)}
    eps = np.full((len(sites), len(results["rounds"])), np.nan)
    for col, entry in enumerate(results["rounds"]):
        if col:
            eps[:, col] = eps[:, col - 1]
        for name, report in (entry.get("privacy") or {}).items():
            value = finite((report or {}).get("epsilon"))
            if value is not None and name in index:
                eps[index[name], col] = value
    return eps


def bytes_by_site(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per site: total bytes down and up, rounds with traffic, and mean bytes up per round."""
    totals: dict[str, dict[str, float]] = {}
    for entry in results["rounds"]:
        for name, counts in (entry.get("update_bytes") or {}).items():
            site = totals.setdefault(name, {"down": 0.0, "up": 0.0, "rounds": 0.0,
                                             "up_rounds": 0.0})
            site["down"] += float(counts.get("down", 0))
            site["up"] += float(counts.get("up", 0))
            site["rounds"] += 1
            site["up_rounds"] += 1 if counts.get("up", 0) else 0
    for site in totals.values():
        site["up_per_round"] = site["up"] / site["up_rounds"] if site["up_rounds"] else 0.0
        site["down_per_round"] = site["down"] / site["rounds"] if site["rounds"] else 0.0
    return totals


def model_float32_bytes(config: dict[str, Any]) -> int | None:
    """Bytes of the run's model as raw float32 (parameters and buffers), None if unknown."""
    try:
        from common.config import RunConfig
        from models import build_model

        cfg = RunConfig.from_mapping(config, strict=False)
        model = build_model(cfg.model, **cfg.network_args())
    except (ValueError, TypeError, ImportError):
        return None
    return 4 * sum(t.numel() for t in model.state_dict().values())


def federation_size(results: dict[str, Any], sites: Sequence[str]) -> int:
    """Sites in the federation: the most ever connected, or those heard from if more."""
    connected = [int(r["sites_connected"]) for r in results["rounds"]
                 if isinstance(r.get("sites_connected"), int)]
    return max([len(sites), *connected])


def run_status(results: dict[str, Any]) -> tuple[str, bool]:
    """A one-line state of the run and whether it has all its configured rounds."""
    done = len(results["rounds"])
    total = int(results["config"].get("rounds", done) or done)
    last = results["rounds"][-1]["round"] if done else 0
    if done == 0:
        return "not started: no round recorded yet", False
    if last < total:
        return (
            f"in progress or stopped: {last} of {total} rounds recorded; run `medfed report` "
            "again when it ends"
        ), False
    return f"finished: {last} of {total} rounds", True




def order_by_last(values: np.ndarray) -> np.ndarray:
    """Row order by each row's last finite value, rows without one last."""
    last = np.array([last_finite(row) for row in values], dtype=float)
    return np.argsort(np.where(np.isnan(last), np.inf, last), kind="stable")


def last_finite(row: np.ndarray) -> float | None:
    """The last finite value of a row; None if it has none."""
    finite = row[np.isfinite(row)]
    return float(finite[-1]) if len(finite) else None
