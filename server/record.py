"""A run's record on the aggregator's disk: results.json, checkpoints, the model file and a plot.

Layout of RUN_DIR:
    results.json        config, per-round metrics, final metrics, each site's privacy spend
                        (and `central_privacy`: the aggregator's user-level DP, when on), and
                        `outcome`: whether the model trained and why not (see `RunRecord.outcome`),
                        `cross_site`: the final model scored at every site on its own test split
                        (server.cross_site)
    model.pt            final global model (state dict + what is needed to rebuild the network,
                        and for a binary classifier `threshold`: call an image positive when
                        P(class 1) >= threshold, the run's operating point); not written when
                        no round of the run trained a site
    .medfed-run.json    what medfed wrote here (common.outputs): all `--force` may delete
    metrics.png         global metrics per round
    model_card.json/.html  the model card (server.model_card), written after results.json
    checkpoint/         state.json (round, config, record so far), arrays.npz, strategy.npz
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from common.atomic import atomic_open
from common.config import RunConfig
from common.metrics import RATE_METRICS
from common.operating import warnings_for
from common.outputs import note, write_json, writing
from common.registry import SITE_PLOT_METRIC as SITE_PLOT_METRIC  # metrics.png per task
from server.federation import RoundLog

if TYPE_CHECKING:
    from server.central_dp import CentralLedger

RESULTS = "results.json"
MODEL = "model.pt"
PLOT = "metrics.png"
CHECKPOINT = "checkpoint"


class CheckpointError(ValueError):
    """A run's checkpoint cannot be read; the message names the file and what to do."""


# Failure kinds that are a site's policy, not a fault: its privacy budget (common.privacy) or
# its approval of the app (common.apps), both classified by server.federation.
POLICY_KINDS = frozenset({"refused"})
OUTCOME_EXIT = {"trained": 0, "failed": 1, "refused": 3}
# what a federated-only run's `final` takes from the operating point (server.operating)
_POINT_KEYS = ("threshold", "auc", "sensitivity", "specificity", "balanced_accuracy",
               "accuracy", "ece", "brier")


def round_trained(entry: dict[str, Any]) -> bool:
    """Whether a round's aggregate took at least one site's training update."""
    aggregate_failed = any(f.get("stage") == "aggregate" for f in entry.get("failures") or [])
    return bool(entry.get("participants")) and not aggregate_failed


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
        # a binary classifier's operating point on P(class 1), saved in model.pt
        self.threshold: float | None = None
        # a segmentation run's plan: the sites' data fingerprints and what they decided
        # (server.fingerprint); None when nothing was planned
        self.plan: dict[str, Any] | None = None
        # the final model's arrays, once the run finished (the cross-site evaluation's model)
        self.final_arrays: dict[str, np.ndarray] | None = None
        # results.json `cross_site` (server.cross_site), filled in at the run's end
        self.cross_site: dict[str, Any] | None = None

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
        entry: dict[str, Any] = {
            "round": log.round,
            "central": central,
            "federated": {"train": log.train_aggregated},
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
        self._sites_and_evaluation(entry, log)
        if self.central_ledger is not None:
            entry["central_privacy"] = self.central_ledger.summary()
        self.rounds.append(entry)
        return entry

    def late_evaluation(self, log: RoundLog) -> None:
        """Round `log.round`'s evaluation, scored at the start of the next (common.evaluation)."""
        entry = next((e for e in self.rounds if e["round"] == log.round), None)
        if entry is not None:
            entry["failures"] = log.failures
            self._sites_and_evaluation(entry, log)

    def _sites_and_evaluation(self, entry: dict[str, Any], log: RoundLog) -> None:
        """Round `log.round`'s per-site figures, evaluation, operating point and warnings."""
        for name in [*log.train, *log.evaluate]:
            if name not in self.sites_seen:
                self.sites_seen.append(name)
        entry["federated"]["evaluate"] = log.evaluate_aggregated
        entry["federated"]["sites"] = {
            name: {"train": log.train.get(name), "evaluate": log.evaluate.get(name)}
            for name in sorted(set(log.train) | set(log.evaluate))
        }
        if log.operating_point is not None:
            # the threshold chosen on the sites' validation histograms this round, what it
            # reaches there, and each site's own rates at it (server.operating)
            entry["operating_point"] = log.operating_point
        if self.cfg.task == "classify":  # what the dashboard warns about while the run goes on
            central = entry["central"]
            measured, where = ((central, "central test set") if central
                               else (log.operating_point, "sites' validation data"))
            entry["warnings"] = warnings_for(measured, where=where) if measured else []

    def final_metrics(self) -> dict[str, Any]:
        """The global model's metrics: central evaluation, or federated when there is none.

        An untrained final model (no round trained a site) has no metrics to show, only
        `trained: false`: its evaluation is the initial model's, already in `initial`. A binary
        classifier's figures are at its operating point (`threshold`); without a central test
        set they are the federated ROC's on the sites' validation data (ECE and Brier score
        estimated from the histograms). `per_site` and `fairness` give each site's own AUC and
        rates at the final threshold, on its validation split, and the worst site and mean.
        """
        if not self.rounds:
            return {}
        if not self.trained:
            return {"trained": False}
        last = self.rounds[-1]
        point = self._last_operating_point()
        if last["central"]:
            final = {**last["central"], **self.final_extra, "source": "central", "trained": True}
        else:
            final = {**last["federated"]["evaluate"], **self.final_extra, "source": "federated",
                     "trained": True}
            if point is not None:
                final.update({k: point[k] for k in _POINT_KEYS if k in point})
                final["data"] = "sites' validation splits (federated ROC, no central test set)"
        if point is not None:
            final["per_site"] = point.get("sites", {})
            final["fairness"] = point.get("fairness", {})
            final["operating_point"] = {k: v for k, v in point.items()
                                        if k not in ("sites", "fairness")}
        return final

    def _last_operating_point(self) -> dict[str, Any] | None:
        """The latest round's operating point (the final threshold's: it changes only there)."""
        for entry in reversed(self.rounds):
            if entry.get("operating_point"):
                point: dict[str, Any] = entry["operating_point"]
                return point
        return None

    def warnings(self) -> list[str]:
        """Why the final classifier should not be used as it is (results.json `warnings`)."""
        final = self.final_metrics()
        if self.cfg.task != "classify" or not final.get("trained"):
            return []
        where = ("central test set" if final.get("source") == "central"
                 else "sites' validation data")
        return warnings_for(final, where=where)

    @property
    def trained(self) -> bool:
        """Whether any round of the run (before a resume too) aggregated a site's update."""
        return any(round_trained(r) for r in self.rounds)

    def outcome(self) -> dict[str, Any]:
        """Whether the run's last round trained, and if not why: results.json's `outcome`.

        status: `trained` (the last round aggregated at least one site's update, exit 0),
        `refused` (it trained no site and every site that failed refused by policy: its privacy
        budget or its approval of the app, exit 3), `failed` (it trained no site for any other
        reason, exit 1). `trained` says whether the final model holds any training at all: a
        run whose rounds 1-3 trained and whose round 4 was refused everywhere ends `refused`
        with `trained: true`, and model.pt is round 3's model.
        """
        trained_rounds = [int(r["round"]) for r in self.rounds if round_trained(r)]
        if not self.rounds:
            status, reason, sites = "failed", "no round completed", {}
        else:
            last = self.rounds[-1]
            # each site's own training failure; "no update could be aggregated" follows from them
            failures = [f for f in last.get("failures") or []
                        if f.get("stage") == "train" and f.get("site") != "*"]
            sites = {
                str(f["site"]): {"kind": f.get("kind", "error"), "reason": f.get("reason", "")}
                for f in failures
            }
            if round_trained(last):
                status, reason = "trained", ""
            elif failures and all(f.get("kind") in POLICY_KINDS for f in failures):
                status = "refused"
                reason = f"every site refused to train in round {last['round']} (policy)"
            elif failures:
                status = "failed"
                reason = f"no site's training update could be used in round {last['round']}"
            elif last.get("failures"):
                status = "failed"
                reason = f"no update could be aggregated in round {last['round']}"
            else:
                status = "failed"
                reason = f"no site was asked to train in round {last['round']} (none connected?)"
        return {
            "status": status,
            "exit_code": OUTCOME_EXIT[status],
            "trained": bool(trained_rounds),
            "trained_rounds": len(trained_rounds),
            "last_trained_round": trained_rounds[-1] if trained_rounds else None,
            "reason": reason,
            "sites": sites,
        }

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
            "warnings": self.warnings(),
            "outcome": self.outcome(),
            "privacy": self.privacy_section(),
            "central_privacy": (
                self.central_ledger.summary() if self.central_ledger is not None else None
            ),
            "artifacts": {"model": MODEL, "plot": PLOT, "checkpoint": CHECKPOINT},
            **({"plan": self.plan} if self.plan is not None else {}),
            **({"cross_site": self.cross_site} if self.cross_site is not None else {}),
        }

    def write_results(self) -> Path:
        """Write results.json; returns its path."""
        path = self.run_dir / RESULTS
        write_json(path, self.to_dict(), then=self._then)
        note(self.run_dir, path)
        return path

    @property
    def _then(self) -> str:
        return f"continue the run with --resume {self.run_dir}" if self.rounds else ""

    # --- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(
        self, arrays: dict[str, np.ndarray], strategy_state: dict[str, np.ndarray]
    ) -> None:
        """Everything needed to resume after this round, swapped in as a whole."""
        final = self.run_dir / CHECKPOINT
        note(self.run_dir, final)
        tmp = Path(tempfile.mkdtemp(dir=self.run_dir, prefix=".checkpoint-"))
        try:
            with writing(final, then=f"continue with --resume {self.run_dir} (the last "
                         "checkpoint is intact)"):
                # through common.atomic for its fsync: the folder swap below is only as
                # whole as what is on disk under it
                for name, content in (("arrays.npz", arrays), ("strategy.npz", strategy_state)):
                    with atomic_open(tmp / name, "wb") as fh:
                        np.savez(fh, allow_pickle=False, **content)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # the old checkpoint stays whole
            raise
        state = {
            "round": self.last_round,
            "config": self.cfg.to_mapping(),
            "started": self.started,
            "initial": self.initial,
            "rounds": self.rounds,
            "privacy": self.privacy,
            "sites_seen": self.sites_seen,
            "plan": self.plan,
            "central_privacy": (
                self.central_ledger.to_state() if self.central_ledger is not None else {}
            ),
            "array_order": list(arrays),
        }
        try:
            write_json(tmp / "state.json", state)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
        """Record, global arrays and strategy state saved by `save_checkpoint`.

        Raises FileNotFoundError (no checkpoint) or CheckpointError (one that cannot be read),
        each naming the file.
        """
        folder = run_dir / CHECKPOINT
        state = checkpoint_state(run_dir)
        try:
            record = cls(run_dir, RunConfig.from_mapping(state["config"]))
            record.started = state["started"]
            record.initial = state["initial"]
            record.rounds = state["rounds"]
            record.privacy = state["privacy"]
            record.sites_seen = state["sites_seen"]
            record.central_privacy = state.get("central_privacy", {})
            record.plan = state.get("plan")
            order = state["array_order"]
        except (KeyError, TypeError, ValueError) as exc:
            raise _broken(folder / "state.json", exc) from None
        arrays = _load_npz(folder / "arrays.npz", order)
        strategy = _load_npz(folder / "strategy.npz", None)
        return record, arrays, strategy

    # --- artefacts ---------------------------------------------------------------------------

    def finish(self, arrays: dict[str, np.ndarray]) -> None:
        """The run's end: model.pt, the plot and results.json.

        No model.pt when no round trained a site: its arrays are the initial model's, and a
        model file of them would pass for a result (results.json's `outcome` says why).
        """
        self.final_arrays = arrays
        if self.trained:
            self.save_model(arrays)
        self.plot()
        self.write_results()

    def save_model(self, arrays: dict[str, np.ndarray]) -> Path:
        """The final model with what is needed to rebuild it (as nanoGPT stores model_args)."""
        path = self.run_dir / MODEL
        note(self.run_dir, path)
        with writing(path):
            self._save_model(path, arrays)
        return path

    def _save_model(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        torch.save(
            {
                "model": self.cfg.model,
                "model_args": self.cfg.network_args(),
                "state_dict": {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()},
                "round": self.last_round,
                "config": self.cfg.to_mapping(),
                **({} if self.threshold is None else {"threshold": float(self.threshold)}),
            },
            path,
        )

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
        note(self.run_dir, path)
        try:
            with writing(path):
                fig.savefig(path, dpi=110)
        finally:
            plt.close(fig)
        return path


def _broken(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint file {path} is unreadable ({type(exc).__name__}: {exc}); it was not "
        "written whole (or was changed since). Resume is not possible from it: start a new run "
        "with another --out (or restore the checkpoint folder from a backup)"
    )


def checkpoint_state(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/checkpoint/state.json, read; errors name the file and what to do."""
    state_file = run_dir / CHECKPOINT / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(
            f"--resume {run_dir}: no checkpoint to resume from ({state_file} is missing); a run "
            "leaves one after each completed round: start a new run instead of --resume"
        )
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise _broken(state_file, exc) from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise _broken(state_file, ValueError("no run config in it"))
    return state


def _load_npz(path: Path, order: list[str] | None) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = npz.files if order is None else order
            return {name: npz[name] for name in names}
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint file {path} is missing; resume is not possible from "
            f"{path.parent}: start a new run with another --out"
        ) from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise _broken(path, exc) from None
