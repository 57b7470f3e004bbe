"""The two processes the simulation-overhead figure compares, each run as its own command.

    python -m bench.jobs sim SPEC.json       # simulations.runner.simulate: Flower + Ray
    python -m bench.jobs baseline SPEC.json  # the same local training steps in plain PyTorch

Both read the same spec (sites, rounds, batch size, DP setting, seed) and write a small JSON of
inner timings to `spec["result"]`; `bench.run` times each command from the outside. The baseline
does what every virtual site does in `client/app.py` `train` (build the model, load the global
weights, one round of `train_local_dp` or `train_local`, with the noise planned once per site as
`PrivacyState.plan` does) and FedAvg's weighted mean, and nothing else: no Flower, no Ray, no
messages, checkpoints, audit logs, privacy files or results.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _config(spec: dict[str, Any]) -> Any:
    from common.config import RunConfig

    return RunConfig(
        sites_dir=spec["sites_dir"], out=spec["out"], rounds=int(spec["rounds"]),
        batch_size=int(spec["batch_size"]), image_size=int(spec["image_size"]),
        dp=bool(spec["dp"]), target_epsilon=float(spec.get("target_epsilon", 8.0)),
        fraction_evaluate=float(spec.get("fraction_evaluate", 0.0)), min_sites=1,
        seed=int(spec.get("seed", 0)), device="cpu",
    )


def run_sim(spec: dict[str, Any]) -> dict[str, Any]:
    """One federation through `simulations.runner.simulate`; returns inner timings."""
    started = time.perf_counter()
    from simulations.runner import simulate
    from simulations.scenario import Federation, Resources

    imported = time.perf_counter()
    # One CPU in Ray's cluster and one per site: Ray runs one site at a time, and the threads
    # mod of simulations/sites.py gives torch int(cpus) threads, as many as the baseline uses.
    threads = int(spec["threads"])
    federation = Federation(
        resources=Resources(cpus=float(threads), ray={"num_cpus": threads})
    )
    results = simulate(_config(spec), federation=federation, quiet=True, force=True)
    done = time.perf_counter()
    trained = [
        [site["train"] for site in entry["federated"]["sites"].values() if site.get("train")]
        for entry in results["rounds"]
    ]
    round_train_s = [sum(float(t["train-seconds"]) for t in sites) for sites in trained]
    # each round's time beyond its sites' training (one site at a time, so their seconds add up)
    round_overhead_ms = [
        1000 * (float(entry["duration_s"]) - train_s)
        for entry, train_s in zip(results["rounds"], round_train_s, strict=True)
    ]
    steps = sum(int(t["steps"]) for sites in trained for t in sites)
    return {
        "round_overhead_ms": round_overhead_ms,
        "import_s": imported - started,
        "simulate_s": done - imported,
        "rounds_s": sum(float(r["duration_s"]) for r in results["rounds"]),
        "site_train_s": sum(round_train_s),
        "steps": steps,
        "final": results.get("final", {}),
    }


def run_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """The same local training steps back to back in this one process; returns timings."""
    started = time.perf_counter()
    import torch

    from common.data import Preprocess, SiteData
    from common.privacy import PrivacyState
    from common.sites import discover_sites
    from common.training.loop import LocalTraining, train_local, train_local_dp
    from models import build_model

    imported = time.perf_counter()
    torch.set_num_threads(int(spec["threads"]))
    cfg = _config(spec)
    pre = Preprocess(image_size=cfg.image_size, channels=cfg.channels)
    sites = []
    for folder in discover_sites(Path(cfg.sites_dir)):
        split = SiteData(folder, pre, seed=cfg.seed).split("train")
        keep = split.labels >= 0
        sites.append((split.images[keep], split.labels[keep]))
    loaded = time.perf_counter()

    def fresh() -> torch.nn.Module:
        return build_model(cfg.model, **cfg.network_args())

    torch.manual_seed(cfg.seed)
    global_state = {k: v.detach().clone() for k, v in fresh().state_dict().items()}
    privacy = [
        PrivacyState.plan(
            num_examples=len(labels), batch_size=cfg.batch_size, rounds=cfg.rounds,
            steps_per_round=cfg.steps_per_round(len(labels)), target_epsilon=cfg.target_epsilon,
            delta=cfg.delta,
            accountant=cfg.accountant, max_grad_norm=cfg.max_grad_norm,
        )
        for _, labels in sites
    ]
    settings = LocalTraining(epochs=cfg.local_epochs, steps=0 if cfg.local_epochs else
                             cfg.local_steps, batch_size=cfg.batch_size,
                             optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum)
    device = torch.device("cpu")
    steps, train_s = 0, 0.0
    for server_round in range(1, cfg.rounds + 1):
        updates, weights = [], []
        for i, (images, labels) in enumerate(sites):
            model = fresh()
            model.load_state_dict(global_state)
            if cfg.dp:
                report = train_local_dp(model, images, labels, settings=settings, device=device,
                                        privacy=privacy[i])
            else:
                report = train_local(model, images, labels, settings=settings, device=device,
                                     seed=cfg.seed * 1000 + server_round)
            steps += report.steps
            train_s += report.seconds
            updates.append({k: v.detach().numpy() for k, v in model.state_dict().items()})
            weights.append(report.num_examples)
        global_state = {
            k: torch.from_numpy(np.average([u[k] for u in updates], axis=0, weights=weights))
            .to(global_state[k].dtype)
            for k in global_state
        }
    done = time.perf_counter()
    return {
        "import_s": imported - started,
        "load_s": loaded - imported,
        "train_loop_s": done - loaded,
        "site_train_s": train_s,
        "steps": steps,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str]) -> int:
    """`python -m bench.jobs sim|baseline SPEC.json`."""
    if len(argv) != 2 or argv[0] not in ("sim", "baseline"):
        print("usage: python -m bench.jobs sim|baseline SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    result = run_sim(spec) if argv[0] == "sim" else run_baseline(spec)
    Path(spec["result"]).write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
