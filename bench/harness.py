"""How the bench runs its workloads.

Where it writes, how big each workload is (quick, full), the torch threads and niceness of every
process, timed commands and the synthetic data.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
