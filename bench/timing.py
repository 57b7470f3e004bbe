"""The bench's timing workloads: the simulation's overhead and DP-SGD's overhead per step."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from typing import Any

from bench.harness import (
    OUT,
    PYTHON,
    RAY_WORKER_NICENESS,
    THREADS,
    Mode,
    all_train,
    log,
    synth,
    timed,
)
from bench.stats import median, ratio

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
