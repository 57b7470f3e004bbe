"""The bench's real-data workload: BreastMNIST hospitals, its results.json keys and its section."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

from bench import hard
from bench.harness import MEDFED, OUT, PYTHON, ROOT, Mode, log, timed

# --- 7. real development data: BreastMNIST --------------------------------------------------------


def breastmnist(mode: Mode) -> dict[str, Any]:
    """`medfed simulate --rounds R` with defaults, with and without DP, on BreastMNIST hospitals.

    Skipped (with a note, never a failure) when the shared development data is not there.
    """
    shared = hard.dev_data(ROOT)
    if shared is None:
        note = (f"skipped: no shared development data at {hard.DEV_DATA} (or "
                f"${hard.DEV_DATA_ENV}); it holds make_sites.py and BreastMNIST")
        log(f"breastmnist {note}")
        return {"skipped": note}
    runs: dict[str, dict[str, Any]] = {}
    for layout, args in hard.BREASTMNIST_LAYOUTS.items():
        data = ROOT / "data" / f"bench-breastmnist-{layout}"
        timed([PYTHON, str(shared / "make_sites.py"), "breastmnist", "--out", str(data),
               *args, "--overwrite"])
        info = json.loads((data / "dataset_info.json").read_text())
        # the defaults as a user runs them, then SCAFFOLD for comparison
        for dp, strategy in itertools.product((False, True), ("", "scaffold")):
            name = f"{layout}_{'dp' if dp else 'nodp'}" + (f"_{strategy}" if strategy else "")
            run = OUT / f"breastmnist-{name}"
            argv = [MEDFED, "simulate", "--data", str(data / "sites"), "--test-data",
                    str(data / "test"), "--out", str(run), "--rounds",
                    str(mode.breastmnist_rounds), "--metrics-port", "0", "--force",
                    *([] if dp else ["--no-dp"]),
                    *(["--strategy", strategy] if strategy else [])]
            try:
                seconds = timed(argv)
            except RuntimeError as exc:  # a run that fails is a figure too: say why
                runs[name] = {"layout": layout, "dp": dp, "strategy": strategy or "default",
                              "error": str(exc)[-1500:]}
                log(f"breastmnist {name} FAILED: {str(exc)[-300:]}")
                continue
            results = json.loads((run / "results.json").read_text())
            point = hard.operating_point(results["final"])
            runs[name] = {
                "layout": layout, "dp": dp, "strategy": results["config"]["strategy"], **point,
                "epsilon_max": hard.epsilon_max(results),
                "outcome": results.get("outcome", {}).get("status"),
                "seconds": seconds,
                "sites": {k: v for k, v in info["folders"].items() if k != "test"},
                "make_sites": " ".join(["make_sites.py breastmnist", *args]),
            }
            log(f"breastmnist {name}: AUC {point['auc']:.3f}, sensitivity "
                f"{point['sensitivity']:.3f}, specificity {point['specificity']:.3f}")
    return {"rounds": mode.breastmnist_rounds, "runs": runs,
            "data": str(shared), "test_images": 156}


def breastmnist_keys(part: dict[str, Any]) -> dict[str, Any]:
    """Flat results.json keys: breastmnist_<layout>_<dp|nodp>_<auc|sensitivity|...>."""
    keys: dict[str, Any] = {}
    for name, run in part.get("runs", {}).items():
        for metric in ("auc", "sensitivity", "specificity", "balanced_accuracy", "epsilon_max"):
            keys[f"breastmnist_{name}_{metric}"] = run.get(metric, math.nan)
    return keys


def breastmnist_markdown(part: dict[str, Any]) -> str:
    """BENCHMARKS.md's real-data section, beside MedMNIST v2's published ResNet-18 figure."""
    lines = ["## Real data: BreastMNIST", ""]
    if not part:
        return "\n".join([*lines, "Not measured in this run (see the notes).", ""])
    if "skipped" in part:
        return "\n".join([*lines, f"Not measured: {part['skipped']}.", ""])
    rounds = part.get("rounds")
    lines += [
        "BreastMNIST (MedMNIST v2, 28x28 breast ultrasound, CC BY 4.0; label 1 = normal or "
        "benign, so sensitivity is for that class) laid out as hospitals by "
        "`../shared/data/make_sites.py`, trained with "
        f"`medfed simulate --data SITES --test-data TEST --rounds {rounds}` and no other flag "
        "(`--no-dp` for the rows without DP; `--strategy scaffold` for the scaffold rows, "
        "the default being fedavg), tested on the official test split "
        f"({part.get('test_images')} images). `hard`: three one-class sites (two of about 30 "
        "images) beside one mixed, the shape of the issue-16 check; `default`: the script's "
        "4 Dirichlet(0.5) label-skewed sites. Sensitivity, specificity and balanced accuracy "
        "are at the run's operating point (results.json `final`).",
        "",
        "Anchor: MedMNIST v2's ResNet-18 at 28 px, trained centrally on the official training "
        "split: test AUC 0.901, ACC 0.863 (Yang et al. 2023). A different network, training "
        "and split, not a target for these layouts.",
        "",
        "| layout | DP | strategy | AUC | sensitivity | specificity | balanced accuracy | "
        "accuracy | max epsilon | time |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, int | float) and math.isfinite(value) else "–"

    for run in part.get("runs", {}).values():
        dp = "epsilon 8" if run["dp"] else "off"
        strategy = run.get("strategy", "default")
        if "error" in run:
            lines.append(f"| {run['layout']} | {dp} | {strategy} | failed: "
                         f"{run['error'].splitlines()[-1][:200]} | | | | | | |")
            continue
        lines.append(
            f"| {run['layout']} | {dp} | {strategy} | {cell(run['auc'])} | "
            f"{cell(run['sensitivity'])} | {cell(run['specificity'])} | "
            f"{cell(run['balanced_accuracy'])} | "
            f"{cell(run['accuracy'])} | {cell(run['epsilon_max'])} | {run['seconds']:.0f} s |"
        )
    return "\n".join([*lines, ""])
