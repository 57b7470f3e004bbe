"""Secure aggregation: a run on Flower's SecAgg+ workflow, recorded like every other run.

Flower 1.41 runs SecAgg+ only on its workflow API (`DefaultWorkflow(fit_workflow=
SecAggPlusWorkflow(...))` over a `LegacyContext` and a legacy strategy). Each site masks its
weighted model with pairwise masks and a private mask, secret-shares the mask seeds among its
neighbours, and the aggregator can remove the masks only from the *sum*: it never holds one
site's unmasked update. A site that drops out after masking is recovered from the shares of the
others while `reconstruction_threshold` of them remain.

This module builds that workflow from a `RunConfig`: FedAvg (weighted by examples, or uniformly
under central DP), Flower's client-side fixed clipping with server noise when `--central-dp
client-fixed` is set, and `SecureRecorder`, a legacy strategy wrapper that records each round into
the same `RunRecord` (results.json, checkpoints, central privacy) as `server.run`.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedProx,
)
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from common.apps import parse_app_refusal
from common.audit_head import METRIC_PREFIX, head_in_metrics
from common.config import RunConfig
from common.policy import parse_run_refusal
from common.privacy import parse_refusal
from common.secure import ARRAY_NAMES, PRIVACY_PREFIX, SITE_NAME
from server.central_dp import CentralLedger, central_noise_multiplier, sampled_sites
from server.federation import RoundLog
from server.record import RunRecord
from server.run import ProgressFn, RoundUpdate, open_record
from server.tasks import Evaluator, central_task

log = logging.getLogger("medfed.server")


def _shares(value: float) -> int | float:
    """A fraction (<= 1) as Flower's float, a count as its int."""
    return float(value) if value <= 1 else int(value)


def _scalars(values: dict[str, Scalar]) -> dict[str, float]:
    return {
        k: float(v) for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
        and not k.startswith((PRIVACY_PREFIX, METRIC_PREFIX))
    }


def _mean_metrics(pairs: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Weighted mean of each numeric metric over sites, skipping undefined (NaN) values."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for weight, metrics in pairs:
        for key, value in _scalars(metrics).items():
            if math.isnan(value):
                continue
            sums[key] = sums.get(key, 0.0) + weight * value
            weights[key] = weights.get(key, 0.0) + weight
    out: dict[str, Scalar] = {k: sums[k] / weights[k] for k in sums if weights[k]}
    out["num-examples"] = sum(weight for weight, _ in pairs)
    return out


# how a site's contained failure begins (client.app): "site <name>: <stage> failed (<kind>)"
_FAILED_SITE = re.compile(r"site ([A-Za-z0-9][A-Za-z0-9._-]{0,63}): \S+ failed")


def _failure_reason(failure: BaseException | tuple[ClientProxy, Any]) -> str:
    if isinstance(failure, tuple):
        return f"status {failure[1].status.message}"
    error = failure.args[0] if failure.args else failure
    return str(getattr(error, "reason", "") or error)


class SecureRecorder(LegacyStrategy):
    """Delegate to a legacy strategy; record each round as `server.run` does for the others."""

    def __init__(
        self,
        inner: LegacyStrategy,
        *,
        cfg: RunConfig,
        record: RunRecord,
        start: dict[str, np.ndarray],
        evaluator: Evaluator | None,
        ledger: CentralLedger | None,
        on_round: ProgressFn | None,
    ) -> None:
        self.inner = inner
        self.cfg = cfg
        self.record = record
        self.names = list(start)
        self.start = start
        self.evaluator = evaluator
        self.ledger = ledger
        self.on_round = on_round
        self.offset = record.last_round
        self.rounds: dict[int, RoundLog] = {}
        self.final = start
        self._site_of: dict[int, str] = {}
        self._sampled: dict[int, list[int]] = {}

    # --- helpers ------------------------------------------------------------------------------

    def _log(self, server_round: int) -> RoundLog:
        r = server_round + self.offset
        return self.rounds.setdefault(r, RoundLog(round=r))

    def _name(self, proxy: ClientProxy) -> str:
        return self._site_of.get(int(proxy.node_id), f"node-{proxy.node_id}")

    def _config(self, server_round: int) -> dict[str, Scalar]:
        values: dict[str, Scalar] = {
            k: v for k, v in self.cfg.to_mapping().items() if k != "proximal-mu"
        }
        values["server-round"] = server_round + self.offset
        values[ARRAY_NAMES] = ",".join(self.names)
        return values

    def _record_failures(
        self, log_: RoundLog, stage: str, answered: set[int], sampled: list[int],
        failures: Sequence[BaseException | tuple[ClientProxy, Any]],
    ) -> None:
        for failure in failures:
            reason = _failure_reason(failure)
            refusal = (
                parse_refusal(reason) or parse_app_refusal(reason) or parse_run_refusal(reason)
            )
            kind, site = "error", "*"
            failed = _FAILED_SITE.search(reason)
            if failed:
                site, reason = failed.group(1), reason[failed.start():].split("\n")[0]
            if refusal is not None:
                kind, (reason, name) = "refused", refusal
                site = name or site
            log_.failures.append({"site": site, "stage": stage, "kind": kind, "reason": reason})
        # A failure names its site but not its node; nodes that never answered and are not
        # explained by one of the failures above timed out or dropped.
        named = {f["site"] for f in log_.failures}
        silent = [
            node for node in sampled
            if node not in answered and self._site_of.get(node, f"node-{node}") not in named
        ]
        for node in silent[: max(0, len(sampled) - len(answered) - len(failures))]:
            log_.failures.append({
                "site": self._site_of.get(node, f"node-{node}"), "stage": stage,
                "kind": "dropped",
                "reason": "no masked update before the round ended (recovered from shares)"
                if stage == "train" else "no reply before the round timeout",
            })

    def _finish_round(self, server_round: int) -> None:
        log_ = self._log(server_round)
        started = time.perf_counter()
        central = self.evaluator(self._state_dict(self.final)) if self.evaluator else None
        entry = self.record.add_round(log_, central, central_s=time.perf_counter() - started)
        self.record.save_checkpoint(self.final, {})
        self.record.write_results()
        if self.on_round:
            self.on_round(RoundUpdate(entry["round"], self.cfg.rounds, entry))

    @staticmethod
    def _state_dict(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}

    # --- legacy Strategy interface ------------------------------------------------------------

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The run's initial (or checkpointed) global model."""
        return ndarrays_to_parameters([self.start[n] for n in self.names])

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Sample sites through the inner strategy; every site gets the whole run config."""
        log_ = self._log(server_round)
        log_.started = time.perf_counter()
        log_.connected = client_manager.num_available()
        pairs = self.inner.configure_fit(server_round, parameters, client_manager)
        sent = []
        for proxy, ins in pairs:
            ins.config.update(self._config(server_round))
            sent.append((proxy, ins))
            log_.add_bytes(self._name(proxy), "down", sum(len(t) for t in ins.parameters.tensors))
        self._sampled[server_round] = [int(p.node_id) for p, _ in sent]
        log_.sampled = [self._name(p) for p, _ in sent]
        return sent

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Record each site's metrics (their models arrive only as the unmasked sum)."""
        log_ = self._log(server_round)
        for proxy, res in results:
            name = str(res.metrics.get(SITE_NAME, f"node-{proxy.node_id}"))
            self._site_of[int(proxy.node_id)] = name
            log_.train[name] = _scalars(res.metrics)
            log_.witness(name, head_in_metrics(res.metrics))
            privacy = {
                k[len(PRIVACY_PREFIX):]: v for k, v in res.metrics.items()
                if k.startswith(PRIVACY_PREFIX)
            }
            if privacy:
                log_.privacy[name] = privacy
        log_.sampled = [self._site_of.get(n, f"node-{n}") for n in self._sampled[server_round]]
        answered = {int(p.node_id) for p, _ in results}
        self._record_failures(log_, "train", answered, self._sampled[server_round], failures)
        if not results:
            return None, {}
        # the unmasked sum goes to the inner strategy (and its DP noise) as if it were a reply
        parameters, metrics = self.inner.aggregate_fit(server_round, results, [])
        if parameters is not None:
            self.final = dict(
                zip(self.names, parameters_to_ndarrays(parameters), strict=True)
            )
            if self.ledger is not None:
                sigma, m = self.ledger.noise_multiplier, self.ledger.num_sampled
                self.ledger.history.append((sigma * len(results) / m, 1.0, 1))
        log_.train_aggregated = _scalars(metrics)
        return parameters, metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Federated evaluation of the new global model at the sites."""
        pairs = self.inner.configure_evaluate(server_round, parameters, client_manager)
        for _, ins in pairs:
            ins.config.update(self._config(server_round))
        self._evaluating = [int(p.node_id) for p, _ in pairs]
        if not pairs:
            self._finish_round(server_round)
        return pairs

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Record each site's evaluation; the round is complete."""
        log_ = self._log(server_round)
        for proxy, res in results:
            name = str(res.metrics.get(SITE_NAME, self._name(proxy)))
            self._site_of[int(proxy.node_id)] = name
            log_.evaluate[name] = {**_scalars(res.metrics), "loss": float(res.loss)}
            log_.witness(name, head_in_metrics(res.metrics))
        answered = {int(p.node_id) for p, _ in results}
        self._record_failures(log_, "evaluate", answered, self._evaluating, failures)
        loss, metrics = self.inner.aggregate_evaluate(server_round, results, [])
        log_.evaluate_aggregated = _scalars(metrics)
        if loss is not None:
            log_.evaluate_aggregated["loss"] = float(loss)
        self._finish_round(server_round)
        return loss, metrics

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Central evaluation happens when the round is recorded (after federated evaluation)."""
        if server_round == 0 and self.evaluator is not None and not self.record.rounds:
            self.record.initial = self.evaluator(self._state_dict(self.start))
        return None


def _base_strategy(cfg: RunConfig, num_sites: int | None) -> LegacyStrategy:
    min_sites = cfg.min_sites if num_sites is None else min(cfg.min_sites, num_sites)
    common: dict[str, Any] = {
        "fraction_fit": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_fit_clients": min_sites,
        "min_evaluate_clients": min_sites if cfg.fraction_evaluate > 0 else 0,
        "min_available_clients": min_sites,
        "fit_metrics_aggregation_fn": _mean_metrics,
        "evaluate_metrics_aggregation_fn": _mean_metrics,
    }
    if cfg.strategy == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    return FedAvg(**common)


def run_secure_federation(
    grid: Grid,
    context: Context,
    cfg: RunConfig,
    *,
    site_dirs: Sequence[Path] = (),
    resume: bool = False,
    on_round: ProgressFn | None = None,
    plan: dict[str, Any] | None = None,
) -> RunRecord:
    """`server.run.run_federation` for `--secure-agg`: the same outputs, on SecAgg+."""
    num_sites = len(site_dirs) or None
    record, start, _ = open_record(cfg, resume=resume, plan=plan)
    remaining = cfg.rounds - record.last_round
    strategy = _base_strategy(cfg, num_sites)
    ledger = None
    if cfg.central_dp == "client-fixed":
        sigma, m = central_noise_multiplier(cfg), sampled_sites(cfg, num_sites)
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy, noise_multiplier=sigma, clipping_norm=cfg.clip_norm, num_sampled_clients=m
        )
        ledger = CentralLedger(
            mode=cfg.central_dp, noise_multiplier=sigma, clipping_norm=cfg.clip_norm,
            delta=cfg.delta, num_sampled=m,
        )
        ledger.load_state(record.central_privacy)
        record.central_ledger = ledger
    if not resume:
        record.write_results()
    recorder = SecureRecorder(
        strategy, cfg=cfg, record=record, start=start,
        evaluator=central_task(cfg.task).evaluator(cfg, site_dirs), ledger=ledger,
        on_round=on_round,
    )
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=remaining, round_timeout=cfg.round_timeout),
        strategy=recorder,
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=_shares(cfg.secagg_shares),
            reconstruction_threshold=_shares(cfg.secagg_threshold),
            max_weight=cfg.secagg_max_weight,
            timeout=cfg.round_timeout,
        )
    )
    log.info(
        "secure aggregation (SecAgg+): shares %s, threshold %s%s", cfg.secagg_shares,
        cfg.secagg_threshold, f", central DP sigma {ledger.noise_multiplier:.3f}" if ledger else "",
    )
    workflow(grid, legacy)
    record.finish(recorder.final)
    return record

