"""The bench's scale workload: memory and harness time per site-round at many sites."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from bench.harness import MEDFED, OUT, ROOT, Mode, synth, thread_env
from bench.stats import median

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
