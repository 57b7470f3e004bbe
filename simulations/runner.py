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
import uuid
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.outputs import note, prepare
from server.model_card import CARD_HTML, CARD_JSON
from server.record import CHECKPOINT, MODEL, PLOT, RESULTS, RunRecord, checkpoint_state
from server.run import ProgressFn
from simulations.faults import FAULTS_FILE
from simulations.report import REPORT
from simulations.scenario import SCENARIO_FILE, Federation
from simulations.site_check import check_site_folders
from simulations.sites import SITE_STATE, simulated_sites


class _DropDeprecation(logging.Filter):
    # `run_simulation` is Flower's supported in-process entry point in 1.41 but logs a
    # deprecation notice pointing at `flwr run`; medfed users did not call it, so hide it.
    def filter(self, record: logging.LogRecord) -> bool:
        return "deprecated" not in record.getMessage().lower()


class _DropSiteTracebacks(logging.Filter):
    # Flower logs every ClientApp exception with Ray's traceback at ERROR. Each failure's
    # reason is in the progress output, results.json and the site's own site.log
    # (RUN_DIR/site-state/<site>/site.log); --verbose shows the tracebacks too.
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        where = os.path.basename(record.pathname)
        if where == "raybackend.py":
            return False
        return not (where == "vce_api.py" and "ClientAppException" in record.getMessage())


def resume_config(run_dir: Path, overrides: dict[str, Any]) -> RunConfig:
    """The config a checkpointed run was started with, with `overrides` (e.g. more rounds)."""
    saved = checkpoint_state(run_dir)["config"]
    # the whole checkpoint, read up front: a damaged or crafted one (arrays that need
    # unpickling) is refused here, naming its file, before any site starts
    RunRecord.load_checkpoint(run_dir)
    saved.update({k.replace("_", "-"): v for k, v in overrides.items()})
    saved["out"] = str(run_dir)
    return RunConfig.from_mapping(saved)


# Everything a simulation writes directly in RUN_DIR (the tasks' pictures are noted as written).
RUN_OUTPUTS = (
    RESULTS, CHECKPOINT, MODEL, PLOT, REPORT, CARD_JSON, CARD_HTML, SITE_STATE, SCENARIO_FILE,
    FAULTS_FILE,
)


def _is_older_run(run_dir: Path) -> bool:
    # a run written before runs kept a manifest: its checkpoint holds the run's config
    try:
        return "config" in checkpoint_state(run_dir)
    except (OSError, ValueError):
        return False


def _clear_previous_run(run_dir: Path, *, force: bool) -> None:
    """Refuse to mix two runs in one folder; with `force`, remove only what medfed wrote there.

    What medfed wrote is listed in RUN_DIR/.medfed-run.json (common.outputs); a user's own
    files stay. A non-empty folder that is no medfed run is refused, `force` or not.
    """
    # a run that stopped before writing results.json (Ray did not start) holds nothing to keep
    started = (run_dir / RESULTS).exists()
    prepare(
        run_dir, force=force or not started, writes=RUN_OUTPUTS, legacy=_is_older_run,
        exists_hint=(
            f"continue it with --resume {run_dir}, choose another --out, or pass --force to "
            "replace the run (only the files medfed wrote are deleted)"
        ),
    )


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
    from common.flower_compat.delivery import prompt_delivery
    from server.app import make_server_app

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
    # the sites' state and a fault log are written from Ray's workers: claimed here, up front
    note(run_dir, run_dir / SCENARIO_FILE, run_dir / SITE_STATE,
         *([run_dir / FAULTS_FILE] if federation.faults.any else []))

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
    droppers: list[logging.Filter] = [_DropDeprecation()]
    if quiet:
        flwr_logger.setLevel(logging.WARNING)
        droppers.append(_DropSiteTracebacks())
    for dropper in droppers:
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
        for dropper in droppers:
            flwr_logger.removeFilter(dropper)
            for handler in flwr_logger.handlers:
                handler.removeFilter(dropper)
    results = run_dir / RESULTS
    if not results.is_file():
        raise RuntimeError(f"the simulation ended without writing {results}; see the log above")
    data: dict[str, Any] = json.loads(results.read_text())
    return data
