"""What a deployed round costs beyond training, against the same round simulated.

    .venv/bin/python -m bench.deploy            # prints the figures as JSON

README's deployment on one machine: `medfed server` (TLS, authenticated sites) and three
`medfed site` processes on 127.0.0.1 (bench.federation), one run of DP rounds submitted with
`medfed run`. The same hospitals and settings then run under `medfed simulate`.

    deploy_round_overhead_s     median over rounds of (the round's wall time at the aggregator
                                - the slowest site's training time in that round)
    deploy_over_sim_round_ratio median deployed round wall time / median simulated round wall
                                time, same hospitals, settings and rounds
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.federation import finish, provisioned, results
from bench.harness import MEDFED, OUT, THREADS, log, synth, thread_env

SITES = 3
IMAGES = 200
ROUNDS = 3
# the local work of every round, on both sides of the ratio (DP at the default epsilon)
SETTINGS = ["--rounds", str(ROUNDS), "--min-sites", str(SITES), "--local-steps", "10",
            "--batch-size", "16", "--seed", "0"]


def _rounds(run: dict[str, Any]) -> list[dict[str, float]]:
    """Each round's wall time and its slowest site's training time (seconds)."""
    rows = []
    for entry in run["rounds"]:
        sites = entry["federated"].get("sites", {})
        slowest = max(float(s["train"]["train-seconds"]) for s in sites.values())
        rows.append({"round": entry["round"], "wall_s": float(entry["duration_s"]),
                     "slowest_train_s": slowest})
    return rows


def deployed_rounds(root: Path) -> dict[str, Any]:
    """Round timings of one deployed run and of the same run simulated.

    The federation runs in a temporary folder (kits, the app's copy, Flower's app installs) and
    leaves its logs and results.json in `root/deployed`.
    """
    shutil.rmtree(root, ignore_errors=True)
    data = synth(OUT / "deploy-data", sites=SITES, images=IMAGES, seed=0, test_images=60)
    names = sorted(p.name for p in (data / "sites").iterdir() if p.is_dir())
    os.environ.update({"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)})
    kept = root / "deployed"
    kept.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="medfed-bench-deploy-") as scratch:
        try:
            with provisioned(Path(scratch), project="bench", data=data, sites=names,
                             timeout=180) as fed:
                code, _, stderr = finish(fed.run("run", *SETTINGS), timeout=900)
                if code != 0:
                    raise RuntimeError(f"medfed run exited {code}:\n{stderr[-3000:]}")
                deployed = _rounds(results(fed.root / "run"))
        finally:
            for log in Path(scratch).glob("*.log"):
                shutil.copy2(log, kept / log.name)
            if (Path(scratch) / "run" / "results.json").is_file():
                shutil.copy2(Path(scratch) / "run" / "results.json", kept / "results.json")
    sim_out = root / "sim"
    proc = subprocess.run(
        [MEDFED, "simulate", "--data", str(data / "sites"), "--out", str(sim_out),
         "--metrics-port", "0", *SETTINGS],
        capture_output=True, text=True, env=thread_env(), check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"medfed simulate exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    simulated = _rounds(results(sim_out))
    overhead = [r["wall_s"] - r["slowest_train_s"] for r in deployed]
    ratio = (statistics.median(r["wall_s"] for r in deployed)
             / statistics.median(r["wall_s"] for r in simulated))
    return {
        "deploy_round_overhead_s": round(statistics.median(overhead), 3),
        "deploy_over_sim_round_ratio": round(ratio, 3),
        "sim_round_median_s": round(statistics.median(r["wall_s"] for r in simulated), 3),
        "sites": SITES, "images_per_site": IMAGES, "rounds": ROUNDS,
        "deployed_rounds": deployed, "simulated_rounds": simulated,
    }


def main() -> int:
    """Measure and print the figures."""
    log("deployed rounds (3 TLS sites on 127.0.0.1) against the same rounds simulated...")
    figures = deployed_rounds(OUT / "deploy")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
