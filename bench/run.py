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
    deploy_round_overhead_s a deployed round's wall time beyond its slowest site's training,
                            median over rounds: README's deployment on 127.0.0.1 (TLS server,
                            3 authenticated sites, bench/deploy.py); with it
                            deploy_over_sim_round_ratio (deployed / simulated round time)
    organ_dice              `medfed simulate --task segment --no-dp`, defaults otherwise, on
                            phantom organs (`medfed synth --masks anatomy`): central Dice over
                            the foreground labels (bench/segment.py; with it the MSD hippocampus
                            Dice per class, when ../shared/data is there)
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import networks
from bench import segment as seg
from bench.breastmnist import breastmnist, breastmnist_keys, breastmnist_markdown
from bench.deploy import deployed_rounds
from bench.figures import figures
from bench.harness import FULL, OUT, QUICK, REPORT, RESULTS, ROOT, THREADS, Mode, log
from bench.quality import hard_scenario, quality_and_bytes, segment_workloads
from bench.scale import scale
from bench.stats import render_markdown
from bench.timing import dp_overhead, sim_overhead

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
    order = ["quality", "hard", "breastmnist", "segment", "scale", "deploy", "dp_overhead",
             "sim_overhead"]
    jobs: dict[str, Callable[[], dict[str, Any]]] = {
        "segment": lambda: segment_workloads(mode),
        "quality": lambda: quality_and_bytes(mode),
        "hard": lambda: hard_scenario(mode),
        "breastmnist": lambda: breastmnist(mode),
        "scale": lambda: scale(mode),
        "deploy": lambda: deployed_rounds(OUT / "deploy"),
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
        "deploy_round_overhead_s": parts.get("deploy", {}).get("deploy_round_overhead_s", nan),
        "deploy_over_sim_round_ratio": parts.get("deploy", {}).get(
            "deploy_over_sim_round_ratio", nan),
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
        "deploy": parts.get("deploy", {}),
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
        "bench/harness.py for why.",
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
