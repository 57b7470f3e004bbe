"""`make bench`: measure medfed's benchmark figures and write bench/results.json and BENCHMARKS.md.

    .venv/bin/python -m bench.run              # quick (about 10 minutes on 2 CPU cores)
    BENCH=full .venv/bin/python -m bench.run   # long: bigger workloads, more repeats
    BENCH_THREADS=2 ...                        # torch threads per training process (default 1)

Figures (each a ratio or an amount measured in this one run of the suite):
    sim_overhead_ratio      wall time of a simulated federation / the same local training steps
                            run back to back in one plain PyTorch process (bench/jobs.py)
    dp_overhead_ratio       DP-SGD (Opacus) time per step / plain time per step, same model, data
    fl_central_auc_ratio    federation's final AUC / centralised training's AUC, same data
    bytes_ratio             model bytes a site sends per round / the model's float32 size
    scale_peak_rss_gib      peak resident memory of the whole process tree at N sites
    scale_ms_per_site_round harness time per site per round at N sites (local compute excluded)
    hard_fl_central_auc_ratio  on simulations/scenarios/hard.toml (one-class and tiny sites, a
                            test prevalence unlike training's), no DP, medfed's defaults: the
                            federation's AUC / central training's AUC with as many optimiser steps
    hard_balanced_accuracy  that federated model's balanced accuracy at its operating point
    breastmnist_*           real data (BreastMNIST, when ../shared/data is there): AUC,
                            sensitivity, specificity, balanced accuracy and the largest epsilon of
                            `medfed simulate --rounds R` with defaults, with and without DP, on a
                            one-class layout and make_sites.py's default layout
    organ_dice              `medfed simulate --task segment --no-dp`, defaults otherwise, on
                            phantom organs (`medfed synth --masks anatomy`): central Dice over
                            the foreground labels (bench/segment.py; with it the MSD hippocampus
                            Dice per class, when ../shared/data is there)
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import hard, networks
from bench import segment as seg
from bench.stats import Figure, median, ratio, render_markdown

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "results.json"
REPORT = ROOT / "BENCHMARKS.md"
PYTHON = sys.executable
# Torch threads per training process, on both sides of every timing ratio. One by default: on a
# shared machine, two-thread OpenMP collapses whenever another process takes a core (measured
# here: 0.76 s per DP step with one thread, 6.4 s with two, under a load average of 8).
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
MEDFED = str(Path(sys.executable).with_name("medfed"))


@dataclass(frozen=True)
class Mode:
    """How big each workload is; `quick` fits in about 10 minutes on 2 CPU cores."""

    name: str
    repeats: int
    overhead_sites: int
    overhead_images: int
    overhead_rounds: int
    dp_steps: int
    quality_sites: int
    quality_images: int
    quality_rounds: int
    central_epochs: int
    quality_seeds: tuple[int, ...]
    scale_sites: int
    scale_rounds: int
    hard_rounds: int
    breastmnist_rounds: int
    organ_sites: int = 4
    organ_images: int = 100
    segment_rounds: int = 20


QUICK = Mode("quick", repeats=3, overhead_sites=2, overhead_images=1280, overhead_rounds=10,
             dp_steps=30, quality_sites=4, quality_images=160, quality_rounds=20,
             central_epochs=15, quality_seeds=(0,), scale_sites=1000, scale_rounds=6,
             hard_rounds=20, breastmnist_rounds=20)
FULL = Mode("full", repeats=5, overhead_sites=2, overhead_images=1280, overhead_rounds=20,
            dp_steps=60, quality_sites=4, quality_images=160, quality_rounds=20,
            central_epochs=15, quality_seeds=(0, 1, 2), scale_sites=1000, scale_rounds=10,
            hard_rounds=20, breastmnist_rounds=20)


def log(message: str) -> None:
    """Progress on stderr (the figures go to the files)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def thread_env() -> dict[str, str]:
    """The environment with THREADS torch threads (Ray keeps it) and Ray workers at niceness 0."""
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
            "RAY_worker_niceness": RAY_WORKER_NICENESS}


# Ray runs its workers at niceness 15 (`worker_niceness`): where other processes compete for the
# CPUs, a simulated site's training then gets a far smaller share than a plain process (measured
# here: 0.7 s per step instead of 0.11 s, and worse as the load grows). Ray's workers run at
# niceness 0 instead, like the baseline, so both sides of a ratio train at the same priority.
RAY_WORKER_NICENESS = "0"


def timed(argv: list[str]) -> float:
    """Wall seconds of a command run with `thread_env`; raises with its output tail if it fails."""
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=thread_env(), cwd=ROOT,
                          check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return seconds


# --- data --------------------------------------------------------------------------------------


def synth(
    folder: Path, *, sites: int, images: int, seed: int, test_images: int = 200, **layout: Any
) -> Path:
    """Synthetic hospitals (medfed synth), reused when already written with the same recipe.

    `layout`: synthesize's hard-layout arguments (site_sizes, one_class_sites, ...).
    """
    recipe = folder / "recipe.json"
    want = {"sites": sites, "images": images, "seed": seed, "test_images": test_images, **layout}
    if recipe.is_file() and json.loads(recipe.read_text()) == want:
        return folder
    from simulations.synth import synthesize

    synthesize(folder, sites=sites, images_per_site=images, seed=seed, test_images=test_images,
               overwrite=True, **layout)
    recipe.write_text(json.dumps(want))
    return folder


def all_train(sites_dir: Path) -> None:
    """Mark every image a training image: no validation or test split, so no evaluation."""
    for labels in sites_dir.glob("*/labels.csv"):
        with labels.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or all(r["split"] == "train" for r in rows):
            continue
        fields = list(rows[0])
        for row in rows:
            row["split"] = "train"
        with labels.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


# --- 1. simulation overhead ----------------------------------------------------------------------


def sim_overhead(
    mode: Mode, on_repeat: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Median wall time of the simulation and of the plain PyTorch baseline, alternated.

    Args:
        on_repeat: called with the figures so far after each repeat (partial results).

    """
    data = synth(OUT / "overhead-data", sites=mode.overhead_sites, images=mode.overhead_images,
                 seed=1)
    all_train(data / "sites")
    spec = {
        "sites_dir": str(data / "sites"), "rounds": mode.overhead_rounds, "batch_size": 32,
        "image_size": 64, "dp": True, "target_epsilon": 8.0, "seed": 0,
        "fraction_evaluate": 0.0,
        # Ray gets THREADS CPUs and each site asks for all of them: one site at a time, with
        # THREADS torch threads, as the baseline trains: same steps, same threads
        "threads": THREADS,
    }
    walls: dict[str, list[float]] = {"sim": [], "baseline": []}
    inner: dict[str, list[dict[str, Any]]] = {"sim": [], "baseline": []}
    for rep in range(mode.repeats):
        for job in ("sim", "baseline"):
            folder = OUT / f"overhead-{job}"
            folder.mkdir(parents=True, exist_ok=True)
            job_spec = {**spec, "out": str(folder / "run"), "result": str(folder / "timing.json")}
            (folder / "spec.json").write_text(json.dumps(job_spec))
            seconds = timed([PYTHON, "-m", "bench.jobs", job, str(folder / "spec.json")])
            walls[job].append(seconds)
            inner[job].append(json.loads((folder / "timing.json").read_text()))
            log(f"overhead repeat {rep + 1}/{mode.repeats}: {job} {seconds:.1f} s")
        if on_repeat is not None and rep + 1 < mode.repeats:
            on_repeat(_overhead_summary(walls, inner, spec, mode))
    return _overhead_summary(walls, inner, spec, mode)


def _overhead_summary(
    walls: dict[str, list[float]], inner: dict[str, list[dict[str, Any]]], spec: dict[str, Any],
    mode: Mode,
) -> dict[str, Any]:
    steps = {job: [t["steps"] for t in inner[job]] for job in inner}
    steady = [ms for t in inner["sim"] for ms in t.get("round_overhead_ms", [])[1:]]
    return {
        "steady_round_overhead_ms": median(steady) if steady else math.nan,
        "ratio": ratio(median(walls["sim"]), median(walls["baseline"])),
        "sim_wall_s": walls["sim"],
        "baseline_wall_s": walls["baseline"],
        "sim_median_s": median(walls["sim"]),
        "baseline_median_s": median(walls["baseline"]),
        "sim_inner": inner["sim"],
        "baseline_inner": inner["baseline"],
        "steps": steps,
        "ray_worker_niceness": RAY_WORKER_NICENESS,
        "workload": {**{k: v for k, v in spec.items() if k != "sites_dir"},
                     "sites": mode.overhead_sites, "images_per_site": mode.overhead_images},
    }


# --- 2. DP overhead ----------------------------------------------------------------------------


def dp_overhead(mode: Mode, device_name: str = "cpu") -> dict[str, Any]:
    """Per-step time of `train_local_dp` over `train_local`: same model, images, batch size."""
    import numpy as np
    import torch

    from common.privacy import PrivacyState
    from common.training.loop import LocalTraining, train_local, train_local_dp
    from models import build_model

    # Opacus warns about secure RNG and RDP orders on every call: known, and not what is timed
    warnings.filterwarnings("ignore", category=UserWarning, module=r"opacus\..*")
    device = torch.device(device_name)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    batch = 32
    n = batch * mode.dp_steps
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, 1, 64, 64)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    settings = LocalTraining(epochs=1, batch_size=batch)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model("cnn", in_channels=1, num_classes=2, image_size=64)

    plain, private = [], []
    for rep in range(mode.repeats + 1):  # the first pair warms up caches and is dropped
        r = train_local(model(), images, labels, settings=settings, device=device)
        privacy = PrivacyState.plan(
            num_examples=n, batch_size=batch, rounds=5, steps_per_round=math.ceil(n / batch),
            target_epsilon=8.0,
            delta=1e-5, accountant="rdp", max_grad_norm=1.0,
        )
        d = train_local_dp(model(), images, labels, settings=settings, device=device,
                           privacy=privacy)
        if rep:
            plain.append(r.seconds / r.steps)
            private.append(d.seconds / d.steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(saved_threads)
    return {
        "ratio": ratio(median(private), median(plain)),
        "plain_step_s": plain,
        "dp_step_s": private,
        "plain_median_s": median(plain),
        "dp_median_s": median(private),
        "steps_per_round": mode.dp_steps,
        "batch_size": batch,
        "device": device_name,
        "threads": threads,
    }


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


# --- 5. scale ----------------------------------------------------------------------------------


def scale(mode: Mode) -> dict[str, Any]:
    """Peak memory of the process tree and harness time per site-round at `scale_sites` sites.

    Runs the scenario `simulations/scenarios/scale-<N>.toml` (virtual sites cut out of one
    synthetic pool) through the `medfed simulate` command, measured from outside.
    """
    from simulations.memory import peak_rss_of_command

    scenario = ROOT / "simulations" / "scenarios" / f"scale-{mode.scale_sites}.toml"
    if not scenario.is_file():
        raise FileNotFoundError(f"{scenario}: no such scenario")
    pool = synth(OUT / "pool", sites=1, images=3000, seed=1, test_images=400)
    run = OUT / f"scale-{mode.scale_sites}"
    argv = [MEDFED, "simulate", "--scenario", str(scenario), "--data",
            str(pool / "sites" / "hospital-01"), "--test-data", str(pool / "test"), "--out",
            str(run), "--rounds", str(mode.scale_rounds), "--metrics-port", "0", "--force"]
    started = time.perf_counter()
    code, peak_gib = peak_rss_of_command(argv, interval=0.2, cwd=ROOT, env=thread_env())
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {code}")
    results = json.loads((run / "results.json").read_text())
    cores = os.cpu_count() or 1
    per_round = []
    for entry in results["rounds"]:
        sites = entry["federated"]["sites"]
        compute = sum(
            float((s.get("train") or {}).get("train-seconds", 0.0)) for s in sites.values()
        )
        sampled = max(1, len(entry.get("sampled") or sites))
        duration = float(entry["duration_s"])
        # the central evaluation scores the global model once a round, whatever the number of
        # sites: model compute like the sites' training, not harness time
        central = float(entry.get("central_s") or 0.0)
        per_round.append({
            "round": entry["round"], "duration_s": duration, "sampled": sampled,
            "connected": entry.get("sites_connected"), "site_train_s": compute,
            "central_s": central,
            "gross_ms_per_site": 1000 * duration / sampled,
            "net_ms_per_site": 1000 * (duration - compute / cores - central) / sampled,
            "ms_per_connected_site": 1000 * duration / max(1, entry.get("sites_connected") or 1),
        })
    steady = per_round[1:] if len(per_round) > 1 else per_round
    return {
        "peak_rss_gib": peak_gib,
        "ms_per_site_round": median([r["net_ms_per_site"] for r in steady]),
        "gross_ms_per_site_round": median([r["gross_ms_per_site"] for r in steady]),
        "ms_per_connected_site_round": median([r["ms_per_connected_site"] for r in steady]),
        "first_round_ms_per_site": per_round[0]["gross_ms_per_site"] if per_round else math.nan,
        "central_ms_per_round": 1000 * median([r["central_s"] for r in steady]),
        "rounds": per_round,
        "sites": mode.scale_sites,
        "wall_s": wall,
        "scenario": str(scenario.relative_to(ROOT)),
        "dp": bool(results["config"].get("dp")),
        "command": " ".join(
            [Path(argv[0]).name, *[str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT))
                                   else a for a in argv[1:]]]
        ),
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


def segment_workloads(mode: Mode) -> dict[str, Any]:
    """Phantom organs (organ_dice) and, when ../shared/data is there, hippocampus MR."""
    env = thread_env()
    return {
        "organs": seg.organs(OUT, sites=mode.organ_sites, images=mode.organ_images,
                             rounds=mode.segment_rounds, env=env),
        "hippocampus": seg.hippocampus(OUT, rounds=mode.segment_rounds, env=env),
    }


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


# --- machine and report ------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import flwr
    import opacus
    import torch

    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = math.nan
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = int(line.split()[1]) / 2**20
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1),
        "os": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "flwr": flwr.__version__, "opacus": opacus.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    return info


def figures(results: dict[str, Any]) -> list[Figure]:
    """The six figures with their goals and how each was measured."""
    o, d, q, s = (results.get(k, {}) for k in ("sim_overhead", "dp_overhead", "quality", "scale"))
    h = results.get("hard", {})
    fl = h.get("fl", {})
    nan = math.nan
    wl = o.get("workload", {})
    sampled = (s.get("rounds") or [{}])[-1].get("sampled", "?")
    figs = [
        Figure(
            "sim_overhead_ratio", "Simulation overhead", results["sim_overhead_ratio"], 1.15,
            how=(
                f"median of {len(o.get('sim_wall_s', []))} alternated repeats: wall time of "
                "`simulations.runner.simulate` in a fresh process "
                f"({o.get('sim_median_s', nan):.1f} s: Flower + Ray start-up, "
                f"{wl.get('sites')} sites x {wl.get('rounds')} rounds "
                f"of DP-SGD, {wl.get('images_per_site')} images per site, batch 32, one site at a "
                f"time with {wl.get('threads')} torch thread(s), no evaluation) over a plain "
                "PyTorch process with the same threads running the same "
                f"local steps back to back ({o.get('baseline_median_s', nan):.1f} s, "
                "`bench/jobs.py`); both timed from the outside, imports and data loading "
                "included; Ray's workers at niceness "
                f"{o.get('ray_worker_niceness', '?')} (Ray's default is 15), so both sides "
                "train at the same priority. Of the simulation's extra "
                f"{o.get('sim_median_s', nan) - o.get('baseline_median_s', nan):.1f} s, rounds 2.. "
                f"took {o.get('steady_round_overhead_ms', nan):.0f} ms each beyond their sites' "
                "training (median); the rest is start-up (Ray, worker imports, round 1) and "
                "shut-down"
            ),
        ),
        Figure(
            "dp_overhead_ratio", "DP-SGD overhead", results["dp_overhead_ratio"], 1.6,
            how=(
                f"median time per step of `train_local_dp` ({d.get('dp_median_s', nan) * 1e3:.1f}"
                f" ms) over `train_local` ({d.get('plain_median_s', nan) * 1e3:.1f} ms): CNN, "
                f"64x64, batch 32, {d.get('steps_per_round')} steps per call (Opacus set-up "
                f"included), {len(d.get('dp_step_s', []))} repeats, {d.get('threads')} threads"
            ),
        ),
        Figure(
            "fl_central_auc_ratio", "Federated / central AUC", results["fl_central_auc_ratio"],
            0.97, higher_is_better=True,
            how=(
                f"FedAvg without DP, {q.get('rounds')} rounds, over central training "
                f"({q.get('central_epochs')} epochs, pooled data) on the same "
                f"{q.get('sites')} non-IID `medfed synth` sites (about {q.get('images_per_site')}"
                " images each), same held-out test set; AUCs "
                + ", ".join(f"seed {x['seed']}: {x['fl_auc']:.3f} / {x['central_auc']:.3f}"
                            for x in q.get("seeds", []))
            ),
        ),
        Figure(
            "bytes_ratio", "Bytes per site per round", results["bytes_ratio"], 1.05,
            how=(
                "median bytes a site sends up per round "
                f"({q.get('bytes_up_per_site_round', nan):,.0f} B, results.json "
                "`update_bytes`) over the model's float32 size "
                f"({q.get('model_float32_bytes', 0):,} B); down per round is "
                f"{q.get('bytes_down_ratio', nan):.2f}x (the model is sent for training and again "
                "for evaluation)"
            ),
        ),
        Figure(
            "scale_peak_rss_gib", f"Peak memory at {s.get('sites', '?')} sites",
            results["scale_peak_rss_gib"], 4.0, unit="GiB",
            how=(
                "peak of the summed RSS of the whole process tree (driver, Ray GCS, raylet and "
                "workers), sampled every 0.2 s from outside by "
                f"`simulations.memory.peak_rss_of_command`: `{s.get('command', '')}` "
                f"({s.get('wall_s', nan):.0f} s)"
            ),
        ),
        Figure(
            "scale_ms_per_site_round",
            f"Time per sampled site per round at {s.get('sites', '?')} sites",
            results["scale_ms_per_site_round"], 20.0, unit="ms",
            how=(
                "same run; median over rounds 2.. of (round wall time - the sampled sites' local "
                "training seconds / cores - the central evaluation's seconds) / sites sampled in "
                f"the round ({sampled} of {s.get('sites', '?')}). What remains is Ray dispatch, "
                "messages, model (de)serialisation, each site's data indexing, DP planning, "
                "ledger, audit and progress writes, the outbound guard and aggregation; central "
                f"evaluation {s.get('central_ms_per_round', nan):.0f} ms a round; gross round "
                "time per "
                f"sampled site {s.get('gross_ms_per_site_round', nan):.1f} ms, per connected "
                f"site {s.get('ms_per_connected_site_round', nan):.2f} ms; round 1 (worker "
                f"start-up) {s.get('first_round_ms_per_site', nan):.0f} ms per sampled site"
            ),
        ),
        Figure(
            "hard_fl_central_auc_ratio", "Hard scenario: federated / central AUC",
            results["hard_fl_central_auc_ratio"], 0.97, higher_is_better=True,
            how=(
                "`simulations/scenarios/hard.toml` (`medfed synth` "
                f"{_synth_flags(h.get('synth', {}))}: 2 mixed sites with Dirichlet label skew, "
                "3 one-class sites of which 2 tiny, test set at 20% lesions), "
                f"`medfed simulate --scenario ... --no-dp --rounds {h.get('rounds')}` with "
                f"medfed's defaults ({h.get('fl_steps')} optimiser steps over all sites), over "
                "`medfed central` on the same sites' pooled training images "
                f"({h.get('train_images')}), same network, {h.get('central_epochs')} epochs = "
                f"{h.get('central_steps')} steps; AUCs {fl.get('auc', nan):.3f} / "
                f"{h.get('central_auc', nan):.3f}"
            ),
        ),
        Figure(
            "hard_balanced_accuracy", "Hard scenario: balanced accuracy",
            results["hard_balanced_accuracy"], hard.BALANCED_ACCURACY_GOAL,
            higher_is_better=True,
            how=(
                "the same federated model on the held-out test set at its operating point "
                "(results.json `final`): (sensitivity + specificity) / 2 = "
                f"({fl.get('sensitivity', nan):.3f} + {fl.get('specificity', nan):.3f}) / 2"
                + (f", threshold {fl['threshold']:.3f}"
                   if math.isfinite(fl.get("threshold", nan)) else "")
                + "; the goal is the real check's floor (sensitivity and specificity >= 0.80)"
            ),
        ),
    ]
    organs = results.get("segment", {}).get("organs", {})
    figs.append(Figure(
        "organ_dice", "Phantom organs: Dice", results["organ_dice"], 0.90, higher_is_better=True,
        how=(f"`{organs.get('synth', 'medfed synth --masks anatomy')}` then "
             f"`{organs.get('command', 'medfed simulate --task segment --no-dp')}`: the final "
             "central Dice, mean over the foreground labels (per label in \"Segmentation\")"),
    ))
    # a workload that has not run (or failed) has no details to describe
    return [f if f.passed is not None else replace(f, how="not measured: see the notes")
            for f in figs]


def _synth_flags(recipe: dict[str, Any]) -> str:
    """hard.HARD_SYNTH as `medfed synth` flags."""
    flags = []
    for key, value in recipe.items():
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        flags.append(f"--{key.replace('_', '-')} {shown}")
    return " ".join(flags)


def _attempt(name: str, fn: Callable[[], dict[str, Any]], errors: dict[str, str]) -> dict[str, Any]:
    log(f"{name}...")
    started = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # one broken workload must not cost the other figures
        errors[name] = f"{type(exc).__name__}: {exc}"
        log(f"{name} FAILED: {errors[name][:500]}")
        return {}
    log(f"{name} done in {time.perf_counter() - started:.0f} s")
    return {**result, "bench_seconds": time.perf_counter() - started}


def main() -> int:
    """Run every workload of the chosen mode and write bench/results.json and BENCHMARKS.md."""
    name = os.environ.get("BENCH", "quick").strip().lower() or "quick"
    if name not in ("quick", "full"):
        print(f"error: BENCH must be quick or full, got {name!r}", file=sys.stderr)
        return 2
    mode = QUICK if name == "quick" else FULL
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    errors: dict[str, str] = {}
    import torch

    parts: dict[str, dict[str, Any]] = {}
    earlier: list[str] = []  # BENCH_ONLY: workloads whose figures come from bench/results.json
    skipped: list[str] = []  # BENCH_ONLY: workloads neither run now nor found there

    def write(pending: list[str]) -> None:
        write_outputs(mode, parts, errors, pending=pending, started=started,
                      load_before=load_before, earlier=earlier, skipped=skipped)

    def partial_overhead(summary: dict[str, Any]) -> None:
        parts["sim_overhead"] = summary
        write(["sim_overhead (more repeats)"])

    # load-insensitive figures first, so that a run cut short still has them on disk
    order = ["quality", "hard", "breastmnist", "segment", "scale", "dp_overhead", "sim_overhead"]
    jobs: dict[str, Callable[[], dict[str, Any]]] = {
        "segment": lambda: segment_workloads(mode),
        "quality": lambda: quality_and_bytes(mode),
        "hard": lambda: hard_scenario(mode),
        "breastmnist": lambda: breastmnist(mode),
        "scale": lambda: scale(mode),
        "dp_overhead": lambda: dp_overhead(mode),
        "sim_overhead": lambda: sim_overhead(mode, on_repeat=partial_overhead),
    }
    only = [k.strip() for k in os.environ.get("BENCH_ONLY", "").split(",") if k.strip()]
    unknown = sorted(set(only) - set(order))
    if unknown:
        print(f"error: BENCH_ONLY names {unknown[0]!r}; it takes {', '.join(order)}",
              file=sys.stderr)
        return 2
    if only:
        # the other workloads' figures stay as the last full run measured them
        previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        for key in order:
            if key not in only:
                parts[key] = previous.get(key) or {}
                (earlier if parts[key] else skipped).append(key)
        order = [k for k in order if k in only]
    for i, key in enumerate(order):
        parts[key] = _attempt(key, jobs[key], errors)
        write(order[i + 1 :])
    if torch.cuda.is_available():
        parts["gpu"] = {"dp_overhead": _attempt("dp_overhead_cuda",
                                                lambda: dp_overhead(mode, "cuda"), errors)}
        write([])
    return 1 if errors else 0


def write_outputs(
    mode: Mode, parts: dict[str, dict[str, Any]], errors: dict[str, str], *,
    pending: list[str], started: float, load_before: float, earlier: list[str] | None = None,
    skipped: list[str] | None = None,
) -> None:
    """Write bench/results.json and BENCHMARKS.md from the workloads measured so far."""
    nan = math.nan
    overhead, dp, quality, scaled = (parts.get(k, {}) for k in
                                     ("sim_overhead", "dp_overhead", "quality", "scale"))
    results: dict[str, Any] = {
        "sim_overhead_ratio": overhead.get("ratio", nan),
        "dp_overhead_ratio": dp.get("ratio", nan),
        "fl_central_auc_ratio": quality.get("ratio", nan),
        "bytes_ratio": quality.get("bytes_ratio", nan),
        "scale_peak_rss_gib": scaled.get("peak_rss_gib", nan),
        "scale_ms_per_site_round": scaled.get("ms_per_site_round", nan),
        "hard_fl_central_auc_ratio": parts.get("hard", {}).get("ratio", nan),
        "hard_balanced_accuracy": parts.get("hard", {}).get("balanced_accuracy", nan),
        "organ_dice": parts.get("segment", {}).get("organs", {}).get("dice", nan),
        **breastmnist_keys(parts.get("breastmnist", {})),
        "machine": machine(),
        "mode": mode.name,
        "threads": THREADS,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": time.perf_counter() - started,
        "complete": not pending,
        "pending": pending,
        # 1-minute load average: above the core count, other processes competed for the CPUs
        "load_average": {"start": load_before, "end": os.getloadavg()[0]},
        "sim_overhead": overhead,
        "dp_overhead": dp,
        "quality": quality,
        "scale": scaled,
        "hard": parts.get("hard", {}),
        "breastmnist": parts.get("breastmnist", {}),
        "segment": parts.get("segment", {}),
        "gpu": parts.get("gpu", {}),
        "errors": errors,
    }
    figs = figures(results)
    results["passed"] = {f.key: f.passed for f in figs}
    RESULTS.write_text(json.dumps(_clean(results), indent=2, allow_nan=False) + "\n")
    notes = [
        f"Measured {results['date']} in {results['seconds'] / 60:.1f} minutes.",
        *([f"PARTIAL: the run was still measuring {', '.join(pending)} when this was written."]
          if pending else []),
        f"Every training process (both sides of each timing ratio, the Ray workers, central "
        f"training) ran with {THREADS} torch thread(s) (`BENCH_THREADS`); see `THREADS` in "
        "bench/run.py for why.",
        *_mode_notes(mode),
        *([f"`BENCH_ONLY` run: the figures of {', '.join(earlier)} are those of the earlier run "
           "kept in bench/results.json."] if earlier else []),
        *([f"`BENCH_ONLY` run: {', '.join(skipped)} not measured (not asked for, and no "
           "earlier figures in bench/results.json)."] if skipped else []),
        _load_note(results["load_average"], results["machine"].get("cores") or 1),
        *[f"`{k}` could not be measured: {v.splitlines()[0][:300]}" for k, v in errors.items()],
    ]
    text = render_markdown(figs, results["machine"], mode=mode.name, notes=notes,
                           command="make bench" if mode.name == "quick"
                           else "BENCH=full make bench")
    # the real-data section goes before the machine description
    segment_part = results["segment"]
    real = breastmnist_markdown(results["breastmnist"]) + "\n" + seg.markdown(
        segment_part.get("organs", {}), segment_part.get("hippocampus", {}))
    text = text.replace("\n## Machine\n", "\n" + real + "\n## Machine\n", 1)
    REPORT.write_text(text)
    if networks.RESULTS.is_file():  # bench.networks measures separately; its section stays
        networks.write_report(json.loads(networks.RESULTS.read_text()))
    if not pending:
        for f in figs:
            log(f"{f.key}: {f.measured_text()} (goal {f.goal_text()}): {f.verdict}")
        log(f"wrote {RESULTS.relative_to(ROOT)} and {REPORT.relative_to(ROOT)}")


def _load_note(load: dict[str, float], cores: int) -> str:
    text = (
        f"1-minute load average {load['start']:.1f} at the start and {load['end']:.1f} at the "
        f"end, on {cores} cores"
    )
    if max(load.values()) > cores:
        return text + (
            ": other processes were competing for the CPUs, so the timings (and the timing "
            "ratios, whose two sides may have met different load) are noisy."
        )
    return text + "."


def _mode_notes(mode: Mode) -> list[str]:
    if mode.name != "quick":
        return []
    return [
        f"Quick mode: the scale figures come from {mode.scale_rounds} rounds of "
        f"`scale-{mode.scale_sites}.toml` (`BENCH=full`: 10 rounds, so the median is over 9 "
        f"rounds instead of {mode.scale_rounds - 1}); the simulation-overhead workload is "
        f"{mode.overhead_rounds} rounds (full: {FULL.overhead_rounds}), and nearly all of the "
        "simulation's extra time is fixed start-up and shut-down (Ray, its workers' imports), "
        "which a longer run spreads thinner; the quality figure uses one data seed (full: "
        "three). The hard scenario and the BreastMNIST runs are as long in both modes "
        f"({mode.hard_rounds} and {mode.breastmnist_rounds} rounds: the length the issue-16 "
        "check runs), a few minutes each.",
    ]


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
