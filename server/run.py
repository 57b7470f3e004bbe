"""One federated run at the aggregator: strategy, central evaluation, checkpoints and results."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, MetricRecordValues
from flwr.serverapp import Grid

from common.config import RunConfig
from common.flower_compat.strategy_state import restore_strategy_state, strategy_state
from common.outputs import note, writing
from server.central import CentralEvaluator
from server.central_dp import CentralPrivacy
from server.federation import RecordingStrategy
from server.fingerprint import with_class_prior
from server.operating import OperatingPoints, previous_threshold
from server.record import RunRecord
from server.screening import ScreeningStrategy
from server.secure import SecAggPlusGrid
from server.strategies import build_strategy
from server.tasks import central_task

log = logging.getLogger("medfed.server")


@dataclass(frozen=True)
class RoundUpdate:
    """What a progress display is told after each round."""

    round: int
    total_rounds: int
    entry: dict[str, Any]


ProgressFn = Callable[[RoundUpdate], None]


def initial_arrays(cfg: RunConfig) -> dict[str, np.ndarray]:
    """Seeded initial weights of the run's model (the task's: e.g. a pretrained encoder)."""
    state = central_task(cfg.task).initial_state(cfg)
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _train_config(cfg: RunConfig) -> ConfigRecord:
    # Sites get the whole run config so they train as configured. `proximal-mu` is left to
    # FedProx, which adds it itself: its presence is what tells a site to apply the term.
    values = {k: v for k, v in cfg.to_mapping().items() if k != "proximal-mu"}
    return ConfigRecord(values)


def _metric_record(values: dict[str, float] | None) -> MetricRecord | None:
    if values is None:
        return None
    typed: dict[str, MetricRecordValues] = dict(values)
    return MetricRecord(typed)


def _to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def open_record(
    cfg: RunConfig, *, resume: bool, plan: dict[str, Any] | None = None
) -> tuple[RunRecord, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The run's record, its starting arrays and saved strategy state (new or checkpointed).

    `plan`: a new segmentation run's plan (server.fingerprint), kept in the record.
    Raises ValueError when a resumed run has no rounds left to train.
    """
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        record = RunRecord(run_dir, cfg)
        record.plan = plan
        prior = (plan or {}).get("choices", {}).get("class-prior")
        return record, with_class_prior(initial_arrays(cfg), prior), {}
    record, start, saved_state = RunRecord.load_checkpoint(run_dir)
    record.cfg = cfg
    if record.last_round >= cfg.rounds:
        raise ValueError(
            f"{run_dir} already completed {record.last_round} rounds of {cfg.rounds}; "
            "pass a larger --rounds to train further"
        )
    log.info("resuming %s after round %d", run_dir, record.last_round)
    return record, start, saved_state


def _noting_new(run_dir: Path, write: Callable[[], Any]) -> Any:
    """Run a task's writer and add what it created in RUN_DIR to the run's manifest."""
    before = {p.name for p in run_dir.iterdir()}
    try:
        with writing(run_dir):  # a full disk names the run folder and the fix
            return write()
    finally:
        note(run_dir, *(p for p in run_dir.iterdir() if p.name not in before))


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    *,
    site_dirs: Sequence[Path] = (),
    resume: bool = False,
    on_round: ProgressFn | None = None,
    plan: dict[str, Any] | None = None,
) -> RunRecord:
    """Run `cfg.rounds` rounds (or the rounds left after a checkpoint) and write the results.

    With `cfg.secure_agg` the same loop runs on `SecAggPlusGrid`: only the way each training
    round's updates reach the aggregator changes (as a masked sum).
    """
    strategy = build_strategy(cfg, num_sites=len(site_dirs) or None)
    central = (
        CentralPrivacy(strategy, cfg, num_sites=len(site_dirs) or None)
        if cfg.central_dp != "off" else None
    )
    record, start, saved_state = open_record(cfg, resume=resume, plan=plan)
    run_dir = record.run_dir
    restore_strategy_state(strategy, saved_state)
    if central is not None:
        central.ledger.load_state(record.central_privacy)
        record.central_ledger = central.ledger
    if not resume:
        record.write_results()  # the run is visible (config, no rounds yet) before round 1
    remaining = cfg.rounds - record.last_round

    task = central_task(cfg.task)
    evaluator = task.evaluator(cfg, site_dirs)
    screened = ScreeningStrategy(central or strategy, z_threshold=cfg.screen_z or None)
    operating = OperatingPoints.for_run(cfg, previous_threshold(record.rounds))
    recording = RecordingStrategy(
        screened, round_offset=record.last_round, operating=operating,
        # SecAgg+ rounds carry no score of the last round's model: every round is evaluated
        evaluate_every=1 if cfg.secure_agg else cfg.evaluate_every, last_round=cfg.rounds,
    )

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        state_dict = arrays.to_torch_state_dict()
        started = time.perf_counter()
        # this round's federated evaluation has just chosen the threshold (Strategy.start runs
        # it before this): the central test set is scored at it, never chooses it
        central: dict[str, float] | None
        if isinstance(evaluator, CentralEvaluator):
            central = evaluator(state_dict, threshold=operating.current)
        else:
            central = evaluator(state_dict) if evaluator else None
        if server_round == 0:
            if not resume:
                record.initial = central
            return _metric_record(central)
        for late in recording.take_late():  # the last round's model, scored in this round
            record.late_evaluation(recording.rounds[late])
        entry = record.add_round(recording.rounds[server_round + recording.round_offset], central,
                                 central_s=time.perf_counter() - started)
        _noting_new(run_dir, lambda: task.after_round(run_dir, cfg, entry["round"], state_dict))
        record.save_checkpoint(_to_numpy(arrays), strategy_state(strategy))
        record.write_results()
        if on_round:
            on_round(RoundUpdate(entry["round"], cfg.rounds, entry))
        return _metric_record(central)

    result = recording.start(
        grid=SecAggPlusGrid(grid, cfg) if cfg.secure_agg else grid,
        initial_arrays=ArrayRecord({k: torch.from_numpy(np.array(v)) for k, v in start.items()}),
        num_rounds=remaining,
        timeout=cfg.round_timeout,
        train_config=_train_config(cfg),
        evaluate_config=_train_config(cfg),
        evaluate_fn=after_round,
    )
    final = _to_numpy(result.arrays) if len(result.arrays) else start
    record.threshold = operating.current
    if record.trained:  # an untrained model's samples or scores are no result either
        record.final_extra = _noting_new(run_dir, lambda: task.finish(
            run_dir, cfg, {k: torch.from_numpy(np.array(v)) for k, v in final.items()},
            site_dirs,
        ))
    record.finish(final)
    return record
