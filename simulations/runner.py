"""Run a federation of virtual hospitals on this machine through Flower's simulation engine (Ray).

Every site folder under `cfg.sites_dir` becomes one virtual SuperNode, or, with a scenario's
`Federation`, N virtual sites cut out of one folder, with faults injected as the scenario says.
The ServerApp runs in this process, so a progress display can follow it round by round;
ClientApps run in Ray workers, each given `resources.cpus` CPUs (torch's thread count follows).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from common.config import RunConfig
from server.record import CHECKPOINT, MODEL, PLOT, RESULTS, RunRecord
from server.run import ProgressFn
from simulations.faults import FAULTS_FILE
from simulations.report import REPORT
from simulations.scenario import SCENARIO_FILE, Federation
from simulations.site_check import check_site_folders
from simulations.sites import simulated_sites


class _DropDeprecation(logging.Filter):
    # `run_simulation` is Flower's supported in-process entry point in 1.41 but logs a
    # deprecation notice pointing at `flwr run`; medfed users did not call it, so hide it.
    def filter(self, record: logging.LogRecord) -> bool:
        return "deprecated" not in record.getMessage().lower()


def resume_config(run_dir: Path, overrides: dict[str, Any]) -> RunConfig:
    """The config a checkpointed run was started with, with `overrides` (e.g. more rounds)."""
    state = run_dir / CHECKPOINT / "state.json"
    if not state.is_file():
        raise FileNotFoundError(
            f"--resume {run_dir}: no checkpoint found ({state} is missing); "
            "a run leaves one after each completed round"
        )
    # the whole checkpoint, read up front: a damaged or crafted one (arrays that need
    # unpickling) is refused here, naming its file, before any site starts
    RunRecord.load_checkpoint(run_dir)
    saved = json.loads(state.read_text())["config"]
    saved.update({k.replace("_", "-"): v for k, v in overrides.items()})
    saved["out"] = str(run_dir)
    return RunConfig.from_mapping(saved)


def _clear_previous_run(run_dir: Path, *, force: bool) -> None:
    """Refuse to mix two runs in one folder; with `force`, remove only medfed's own files."""
    ours = [RESULTS, CHECKPOINT, MODEL, PLOT, REPORT, "site-state", SCENARIO_FILE, FAULTS_FILE]
    present = [run_dir / name for name in ours if (run_dir / name).exists()]
    if not present:
        return
    if not force:
        raise FileExistsError(
            f"--out {run_dir} already holds a run; continue it with --resume {run_dir}, "
            "choose another --out, or pass --force to replace it"
        )
    for path in present:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def simulate(
    cfg: RunConfig,
    *,
    resume: bool = False,
    on_round: ProgressFn | None = None,
    quiet: bool = True,
    force: bool = False,
    federation: Federation | None = None,
) -> dict[str, Any]:
    """Run the federation described by `cfg`; returns the content of RUN_DIR/results.json.

    Args:
        federation: a scenario's sites, faults and resources (default: one site per folder
            under `cfg.sites_dir`, no faults, 1 CPU per site); on resume, the one the run was
            started with.

    """
    # Import Flower lazily: `medfed synth` and `check-data` should not pay for it.
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app
    from simulations.flower_patches import prompt_delivery

    if not cfg.sites_dir:
        raise ValueError("--data is required: the folder holding one folder per site")
    run_dir = Path(cfg.out).resolve()
    if federation is None and resume:
        federation = Federation.saved(run_dir)
    federation = federation or Federation()
    sites = simulated_sites(cfg, federation, run_dir)
    if len(sites.refs) < cfg.min_sites:
        raise ValueError(
            f"--data {cfg.sites_dir} holds {len(sites.refs)} site(s) but --min-sites is "
            f"{cfg.min_sites}; add sites or lower --min-sites"
        )
    # Before any file is written or Ray starts: an unusable folder would fail every round.
    check_site_folders(cfg, sites.data_dirs)
    cfg = cfg.replace(
        out=str(run_dir),
        sites_dir=str(Path(cfg.sites_dir).resolve()),
        test_data=str(Path(cfg.test_data).resolve()) if cfg.test_data else "",
        run_key=cfg.run_key or uuid.uuid4().hex,
    )
    if not resume:
        _clear_previous_run(run_dir, force=force)
    run_dir.mkdir(parents=True, exist_ok=True)
    federation.save(run_dir)

    gpus_per_site = federation.resources.gpus
    if gpus_per_site is None:
        import torch

        gpus_per_site = 0.0 if not torch.cuda.is_available() or cfg.device == "cpu" else 0.25
    init_args: dict[str, Any] = {
        "num_cpus": os.cpu_count() or 1,
        "include_dashboard": False,
        "logging_level": logging.ERROR,
        "log_to_driver": not quiet,
    }
    if "address" in federation.resources.ray:
        # an existing cluster has its own resources; Ray refuses num_cpus when attaching
        init_args.pop("num_cpus")
    init_args.update(federation.resources.ray)
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": federation.resources.cpus, "num_gpus": gpus_per_site},
        "init_args": init_args,
    }
    flwr_logger = logging.getLogger("flwr")
    saved_level = flwr_logger.level
    dropper = _DropDeprecation()
    if quiet:
        flwr_logger.setLevel(logging.WARNING)
    flwr_logger.addFilter(dropper)
    for handler in flwr_logger.handlers:
        handler.addFilter(dropper)
    try:
        with prompt_delivery():
            run_simulation(
                server_app=make_server_app(
                    cfg, site_dirs=sites.data_dirs, resume=resume, on_round=on_round
                ),
                client_app=make_client_app(
                    sites.refs, data=sites.data, mods=sites.mods, outer_mods=sites.outer_mods
                ),
                num_supernodes=len(sites.refs),
                backend_config=backend_config,
            )
    finally:
        flwr_logger.setLevel(saved_level)
        flwr_logger.removeFilter(dropper)
        for handler in flwr_logger.handlers:
            handler.removeFilter(dropper)
    results = run_dir / RESULTS
    if not results.is_file():
        raise RuntimeError(f"the simulation ended without writing {results}; see the log above")
    data: dict[str, Any] = json.loads(results.read_text())
    return data
