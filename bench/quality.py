"""The bench's quality workloads.

The federation against central training (non-IID sites, the hard scenario), bytes per round, and
the segmentation workloads.
"""

from __future__ import annotations

import json
import math
from typing import Any

from bench import hard
from bench import segment as seg
from bench.harness import MEDFED, OUT, ROOT, Mode, log, synth, thread_env, timed
from bench.stats import median, ratio

# --- 3 and 4. quality against central training, and bytes per round -----------------------------


def quality_and_bytes(mode: Mode) -> dict[str, Any]:
    """FedAvg (no DP) against central training on the same non-IID synthetic sites."""
    from models import build_model

    per_seed = []
    bytes_up: list[float] = []
    bytes_down: list[float] = []
    for seed in mode.quality_seeds:
        data = synth(OUT / f"quality-data-{seed}", sites=mode.quality_sites,
                     images=mode.quality_images, seed=seed)
        run, central = OUT / f"quality-fl-{seed}", OUT / f"quality-central-{seed}"
        fl_s = timed([MEDFED, "simulate", "--data", str(data / "sites"), "--test-data",
                      str(data / "test"), "--out", str(run), "--rounds", str(mode.quality_rounds),
                      "--no-dp", "--strategy", "fedavg", "--metrics-port", "0", "--force"])
        central_s = timed([MEDFED, "central", "--data", str(data / "sites"), "--test-data",
                           str(data / "test"), "--out", str(central), "--epochs",
                           str(mode.central_epochs)])
        results = json.loads((run / "results.json").read_text())
        fl_auc = float(results["final"]["auc"])
        central_auc = float(json.loads((central / "central.json").read_text())["final"]["auc"])
        per_seed.append({"seed": seed, "fl_auc": fl_auc, "central_auc": central_auc,
                         "ratio": ratio(fl_auc, central_auc), "fl_s": fl_s,
                         "central_s": central_s})
        log(f"quality seed {seed}: federated AUC {fl_auc:.3f}, central {central_auc:.3f}")
        for entry in results["rounds"]:
            for counts in entry["update_bytes"].values():
                if counts["up"]:
                    bytes_up.append(float(counts["up"]))
                bytes_down.append(float(counts["down"]))
    cfg = results["config"]
    model = build_model(cfg["model"], in_channels=cfg["channels"],
                        num_classes=cfg["num-classes"], image_size=cfg["image-size"])
    float32 = 4 * sum(t.numel() for t in model.state_dict().values())
    return {
        "ratio": median([s["ratio"] for s in per_seed]),
        "seeds": per_seed,
        "rounds": mode.quality_rounds,
        "central_epochs": mode.central_epochs,
        "sites": mode.quality_sites,
        "images_per_site": mode.quality_images,
        "model_float32_bytes": float32,
        "bytes_up_per_site_round": median(bytes_up),
        "bytes_down_per_site_round": median(bytes_down),
        "bytes_ratio": ratio(median(bytes_up), float32),
        "bytes_down_ratio": ratio(median(bytes_down), float32),
    }


# --- 6. the hard scenario: one-class and tiny sites, another test prevalence ---------------------


def hard_scenario(mode: Mode) -> dict[str, Any]:
    """The hard scenario's federation against central training with as many optimiser steps.

    simulations/scenarios/hard.toml runs through `medfed simulate` (no DP, defaults otherwise);
    `medfed central` trains the same network on the same sites' pooled training images.
    """
    scenario = ROOT / "simulations" / "scenarios" / "hard.toml"
    knobs = {k: v for k, v in hard.HARD_SYNTH.items()
             if k not in ("sites", "seed", "test_images")}
    data = synth(OUT / "hard-data", sites=hard.HARD_SYNTH["sites"], images=200,
                 seed=hard.HARD_SYNTH["seed"], test_images=hard.HARD_SYNTH["test_images"],
                 **knobs)
    run, central = OUT / "hard-fl", OUT / "hard-central"
    fl_s = timed([MEDFED, "simulate", "--scenario", str(scenario), "--data", str(data / "sites"),
                  "--test-data", str(data / "test"), "--out", str(run), "--rounds",
                  str(mode.hard_rounds), "--no-dp", "--metrics-port", "0", "--force"])
    results = json.loads((run / "results.json").read_text())
    steps = hard.fl_steps(results)
    rows = hard.labelled_train_rows(data / "sites")
    epochs = hard.central_epochs(steps, rows, int(results["config"]["batch-size"]))
    central_s = timed([MEDFED, "central", "--data", str(data / "sites"), "--test-data",
                       str(data / "test"), "--out", str(central), "--epochs", str(epochs)])
    baseline = json.loads((central / "central.json").read_text())
    point = hard.operating_point(results["final"])
    central_auc = float(baseline["final"]["auc"])
    log(f"hard scenario: federated AUC {point['auc']:.3f} (balanced accuracy "
        f"{point['balanced_accuracy']:.3f}), central {central_auc:.3f}")
    return {
        "ratio": ratio(point["auc"], central_auc),
        "balanced_accuracy": point["balanced_accuracy"],
        "fl": point,
        "central_auc": central_auc,
        "central_auc_by_epoch": [e["auc"] for e in baseline["epochs"]],
        "central_epochs": epochs,
        "central_steps": epochs * math.ceil(rows / int(results["config"]["batch-size"])),
        "fl_steps": steps,
        "train_images": rows,
        "rounds": mode.hard_rounds,
        "outcome": results.get("outcome", {}).get("status"),
        "synth": hard.HARD_SYNTH,
        "fl_s": fl_s,
        "central_s": central_s,
    }


def segment_workloads(mode: Mode) -> dict[str, Any]:
    """Phantom organs (organ_dice) and, when ../shared/data is there, hippocampus MR."""
    env = thread_env()
    return {
        "organs": seg.organs(OUT, sites=mode.organ_sites, images=mode.organ_images,
                             rounds=mode.segment_rounds, env=env),
        "hippocampus": seg.hippocampus(OUT, rounds=mode.segment_rounds, env=env),
    }
