"""The bench's figures for BENCHMARKS.md: each with its goal and how it was measured."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from bench import hard
from bench.stats import Figure


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
                f"{q.get('bytes_down_ratio', nan):.2f}x (the model is sent for training, and again "
                "for each evaluation message)"
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
    dep = results.get("deploy", {})
    figs.append(Figure(
        "deploy_round_overhead_s", "Deployed round beyond training",
        results.get("deploy_round_overhead_s", nan), 3.0, unit="s",
        how=(
            f"README's deployment on 127.0.0.1 (`medfed server` with TLS, {dep.get('sites')} "
            "authenticated `medfed site`s with their warm workers, `medfed run`), "
            f"{dep.get('rounds')} rounds of DP-SGD, {dep.get('images_per_site')} images per site "
            "(bench/deploy.py): median over rounds of (the round's wall time at the aggregator - "
            "its slowest site's training seconds); per round "
            + ", ".join(f"{r['wall_s']:.1f} s - {r['slowest_train_s']:.1f} s"
                        for r in dep.get("deployed_rounds", []))
            + f". The same rounds simulated: median {dep.get('sim_round_median_s', nan):.1f} s; "
            f"deployed / simulated round time `deploy_over_sim_round_ratio` "
            f"{results.get('deploy_over_sim_round_ratio', nan):.2f}"
        ),
    ))
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
