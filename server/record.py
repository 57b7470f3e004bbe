"""A run's record on the aggregator's disk: results.json, checkpoints, the model file and a plot.

Layout of RUN_DIR:
    results.json        config, per-round metrics, final metrics, each site's privacy spend
                        (and `central_privacy`: the aggregator's user-level DP, when on)
    model.pt            final global model (state dict + what is needed to rebuild the network)
    metrics.png         global metrics per round
    checkpoint/         state.json (round, config, record so far), arrays.npz, strategy.npz
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from common.config import RunConfig
from common.metrics import RATE_METRICS
from common.modelfile import UnsafeModelFile, load_npz
from server.federation import RoundLog

if TYPE_CHECKING:
    from server.central_dp import CentralLedger

RESULTS = "results.json"
MODEL = "model.pt"
PLOT = "metrics.png"
CHECKPOINT = "checkpoint"
# the per-site validation metric metrics.png shows for each task
SITE_PLOT_METRIC = {
    "classify": "auc", "segment": "dice", "autoencode": "anomaly-auroc",
    "synthesize": "d-accuracy",
}


def json_clean(value: Any) -> Any:
    """NaN and infinities become null: results.json stays strict JSON any tool can read."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_clean(v) for v in value]
    if isinstance(value, np.generic):
        return json_clean(value.item())
    return value


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as fh:
        json.dump(json_clean(data), fh, indent=2, allow_nan=False)
    os.replace(tmp, path)


class RunRecord:
    """What the aggregator knows about a run, round by round."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.initial: dict[str, float] | None = None
        self.rounds: list[dict[str, Any]] = []
        self.privacy: dict[str, dict[str, Any]] = {}
        self.sites_seen: list[str] = []
        # central (user-level) DP: the aggregator's own releases; state kept for resumes
        self.central_ledger: CentralLedger | None = None
        self.central_privacy: dict[str, Any] = {}
        # the task's metrics of the final model beyond each round's (a GAN's TSTR AUC)
        self.final_extra: dict[str, float] = {}

    @property
    def last_round(self) -> int:
        """The last round completed (0 before the first)."""
        return int(self.rounds[-1]["round"]) if self.rounds else 0

    def add_round(
        self, log: RoundLog, central: dict[str, float] | None, *, central_s: float = 0.0
    ) -> dict[str, Any]:
        """Fold one round's observations into the record; returns the round's entry.

        Args:
            central_s: seconds the central evaluation took (part of `duration_s`).

        """
        for name, report in log.privacy.items():
            self.privacy[name] = report
        for name in [*log.train, *log.evaluate]:
            if name not in self.sites_seen:
                self.sites_seen.append(name)
        sites: dict[str, dict[str, Any]] = {}
        for name in sorted(set(log.train) | set(log.evaluate)):
            sites[name] = {"train": log.train.get(name), "evaluate": log.evaluate.get(name)}
        entry = {
            "round": log.round,
            "central": central,
            "federated": {
                "train": log.train_aggregated,
                "evaluate": log.evaluate_aggregated,
                "sites": sites,
            },
            "sampled": log.sampled,
            "participants": log.participants,
            "failures": log.failures,
            "duration_s": time.perf_counter() - log.started,
            "central_s": central_s,
            "finished_at": time.time(),
            "sites_connected": log.connected,
            "privacy": log.privacy,
            "update_bytes": log.update_bytes,
            # what the aggregator witnessed of each site's audit trail (`medfed site audit
            # --verify --witness results.json` checks the site's trail against it)
            "audit_heads": log.audit_heads,
        }
        if self.central_ledger is not None:
            entry["central_privacy"] = self.central_ledger.summary()
        self.rounds.append(entry)
        return entry

    def final_metrics(self) -> dict[str, Any]:
        """The global model's metrics: central evaluation, or federated when there is none."""
        if not self.rounds:
            return {}
        last = self.rounds[-1]
        if last["central"]:
            return {**last["central"], **self.final_extra, "source": "central"}
        return {**last["federated"]["evaluate"], **self.final_extra, "source": "federated"}

    def privacy_section(self) -> dict[str, dict[str, Any]]:
        """Each site's privacy spend; sites without DP get epsilon null (no guarantee)."""
        if not self.cfg.dp:
            return {name: {"dp": False, "epsilon": None} for name in sorted(self.sites_seen)}
        return {name: {"dp": True, **self.privacy[name]} for name in sorted(self.privacy)}

    def to_dict(self) -> dict[str, Any]:
        """The content of results.json."""
        return {
            "config": self.cfg.to_mapping(),
            "started": self.started,
            "initial": self.initial,
            "rounds": self.rounds,
            "final": self.final_metrics(),
            "privacy": self.privacy_section(),
            "central_privacy": (
                self.central_ledger.summary() if self.central_ledger is not None else None
            ),
            "artifacts": {"model": MODEL, "plot": PLOT, "checkpoint": CHECKPOINT},
        }

    def write_results(self) -> Path:
        """Write results.json; returns its path."""
        path = self.run_dir / RESULTS
        write_json(path, self.to_dict())
        return path

    # --- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(
        self, arrays: dict[str, np.ndarray], strategy_state: dict[str, np.ndarray]
    ) -> None:
        """Everything needed to resume after this round, swapped in as a whole."""
        final = self.run_dir / CHECKPOINT
        tmp = Path(tempfile.mkdtemp(dir=self.run_dir, prefix=".checkpoint-"))
        np.savez(tmp / "arrays.npz", allow_pickle=False, **arrays)
        np.savez(tmp / "strategy.npz", allow_pickle=False, **strategy_state)
        state = {
            "round": self.last_round,
            "config": self.cfg.to_mapping(),
            "started": self.started,
            "initial": self.initial,
            "rounds": self.rounds,
            "privacy": self.privacy,
            "sites_seen": self.sites_seen,
            "central_privacy": (
                self.central_ledger.to_state() if self.central_ledger is not None else {}
            ),
            "array_order": list(arrays),
        }
        write_json(tmp / "state.json", state)
        old = self.run_dir / ".checkpoint-old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load_checkpoint(
        cls, run_dir: Path
    ) -> tuple[RunRecord, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Record, global arrays and strategy state saved by `save_checkpoint`."""
        folder = run_dir / CHECKPOINT
        state_file = folder / "state.json"
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{run_dir}: no checkpoint to resume from (expected {state_file}); "
                "start a new run instead of --resume"
            )
        state = json.loads(state_file.read_text())
        record = cls(run_dir, RunConfig.from_mapping(state["config"]))
        record.started = state["started"]
        record.initial = state["initial"]
        record.rounds = state["rounds"]
        record.privacy = state["privacy"]
        record.sites_seen = state["sites_seen"]
        record.central_privacy = state.get("central_privacy", {})
        saved = load_npz(folder / "arrays.npz")
        missing = [name for name in state["array_order"] if name not in saved]
        if missing:
            raise UnsafeModelFile(
                f"{folder / 'arrays.npz'}: lacks arrays {missing[:3]} that {state_file} lists; "
                "the checkpoint is damaged: start a new run instead of --resume"
            )
        arrays = {name: saved[name] for name in state["array_order"]}
        strategy = load_npz(folder / "strategy.npz")
        return record, arrays, strategy

    # --- artefacts ---------------------------------------------------------------------------

    def save_model(self, arrays: dict[str, np.ndarray]) -> Path:
        """The final model with what is needed to rebuild it (as nanoGPT stores model_args)."""
        path = self.run_dir / MODEL
        torch.save(
            {
                "model": self.cfg.model,
                "model_args": {
                    "in_channels": self.cfg.channels,
                    "num_classes": self.cfg.num_classes,
                    "image_size": self.cfg.image_size,
                },
                "state_dict": {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()},
                "round": self.last_round,
                "config": self.cfg.to_mapping(),
            },
            path,
        )
        return path

    def plot(self) -> Path:
        """PNG of central metrics and per-site federated AUC per round."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = self.run_dir / PLOT
        fig, (ax_central, ax_sites) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
        rounds = [r["round"] for r in self.rounds]
        for name in RATE_METRICS:
            xs = ([0] if self.initial else []) + rounds
            ys = ([self.initial.get(name)] if self.initial else []) + [
                (r["central"] or {}).get(name) for r in self.rounds
            ]
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if pts:
                ax_central.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax_central.set(title="Global model, central test set", xlabel="round", ylim=(0, 1.02))
        if ax_central.lines:
            ax_central.legend(loc="lower right")
        sites = sorted({s for r in self.rounds for s in r["federated"]["sites"]})
        site_metric = SITE_PLOT_METRIC.get(self.cfg.task, "auc")
        for site in sites:
            pts = []
            for r in self.rounds:
                ev = (r["federated"]["sites"].get(site) or {}).get("evaluate") or {}
                value = ev.get(site_metric)
                if value is not None and not math.isnan(value):
                    pts.append((r["round"], value))
            if pts:
                ax_sites.plot(*zip(*pts, strict=True), marker=".", label=site)
        ax_sites.set(title=f"Global model {site_metric} at each site (validation)", xlabel="round",
                     ylim=(0, 1.02))
        if ax_sites.lines:
            ax_sites.legend(loc="lower right", fontsize="small")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
