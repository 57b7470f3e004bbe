"""Secure aggregation: the run's Grid, with each training round summed under SecAgg+ masks.

Flower 1.41 runs SecAgg+ only on its workflow API (`SecAggPlusWorkflow` over a `LegacyContext`
and a legacy strategy). Each site masks its weighted model with pairwise masks and a private
mask, secret-shares the mask seeds among its neighbours, and the aggregator can remove the masks
only from the *sum*: it never holds one site's unmasked update. A site that drops out after
masking is recovered from the shares of the others while `reconstruction_threshold` of them
remain.

`SecAggPlusGrid` is an adapter, not a second federation loop: `server.run` runs the same
`Strategy.start` loop, strategy wrappers (central DP, recording), central evaluation, task hooks
and run record with or without it. The adapter changes only how a training round's replies come
back. It sends the round's instructions through Flower's SecAgg+ stages (in the legacy FitIns
form a site's `client.secure.legacy_mod` reads), and answers with one reply per site, each
holding the unmasked weighted mean in place of the site's update and the site's own metrics,
privacy report and audit head. This is what Flower's workflow itself hands a legacy strategy
(`fitres.parameters = <the aggregate>` for every result): averaging the identical replies again
leaves the mean as it is, and central DP's noise is added to it as to any mean. Evaluation
messages pass through unchanged (metrics only, no update leaves a site).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
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
from flwr.common.constant import ErrorCode
from flwr.server import LegacyContext
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from common.audit_head import HEAD_RECORD, METRIC_PREFIX, head_in_metrics
from common.config import RunConfig
from common.secure import ARRAY_NAMES, PRIVACY_PREFIX, SITE_NAME
from server.grids import Delegating

log = logging.getLogger("medfed.server")

# the Message-API records a training instruction carries (Flower's strategies' default keys)
_ARRAYS, _CONFIG = "arrays", "config"
# the record of a legacy training reply that holds its metrics (flwr.compat's FitRes layout)
_FIT_METRICS = "fitres.metrics"


def _shares(value: float) -> int | float:
    """A fraction (<= 1) as Flower's float, a count as its int."""
    return float(value) if value <= 1 else int(value)


class SecAggPlusGrid(Delegating):
    """`grid` with each training round run through Flower's SecAgg+ stages."""

    def __init__(self, grid: Grid, cfg: RunConfig) -> None:
        super().__init__(grid)
        self.shares = _shares(cfg.secagg_shares)
        self.threshold = _shares(cfg.secagg_threshold)
        self.max_weight = cfg.secagg_max_weight
        log.info("secure aggregation (SecAgg+): shares %s, threshold %s", cfg.secagg_shares,
                 cfg.secagg_threshold)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Training instructions go through SecAgg+; everything else is sent as it is."""
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return self.grid.send_and_receive(messages, timeout=timeout)
        return self._secure_round(messages, timeout)

    def _secure_round(self, messages: list[Message], timeout: float | None) -> list[Message]:
        model = messages[0].content.array_records[_ARRAYS]
        # SecAgg+ dequantises to float64; the mean goes on in the global model's dtypes
        dtypes = {name: np.dtype(array.dtype) for name, array in model.items()}
        server_round = cast(int, messages[0].content.config_records[_CONFIG]["server-round"])
        by_node = {m.metadata.dst_node_id: m for m in messages}
        run_id = self.grid.run.run_id
        parameters = ndarrays_to_parameters([array.numpy() for array in model.values()])
        instructions: list[tuple[ClientProxy, FitIns]] = [
            (GridClientProxy(node, self.grid, run_id), _fit_ins(msg, parameters, list(dtypes)))
            for node, msg in by_node.items()
        ]
        collector = _RoundCollector(instructions)
        watched = _WatchedGrid(self.grid)
        legacy = LegacyContext(
            Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            strategy=collector,
        )
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round, WorkflowKey.START_TIME: time.time()}
        )
        # unread: the collector hands out the instructions made above
        legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        SecAggPlusWorkflow(
            num_shares=self.shares, reconstruction_threshold=self.threshold,
            max_weight=self.max_weight, timeout=timeout,
        )(watched, legacy)

        replies: list[Message] = []
        results = {int(proxy.node_id): res for proxy, res in collector.results or []}
        for node, msg in by_node.items():
            if node in results:
                replies.append(Message(_site_reply(results[node], dtypes), reply_to=msg))
            elif node in watched.errors:
                replies.append(watched.errors[node])
            elif node not in watched.silent:
                # it answered every stage it was asked, but the protocol stopped short of the sum
                site = f"site {watched.names[node]}: " if node in watched.names else ""
                replies.append(Message(Error(ErrorCode.UNKNOWN, reason=(
                    f"{site}round {server_round}: SecAgg+ stopped before the masked sum could be "
                    "unmasked (it needs at least 2 sites and, for every site, "
                    f"--secagg-threshold {self.threshold} of its shares); no update was used"
                )), reply_to=msg))
        return replies  # a site that went silent has no reply: the recorder counts a timeout


def _fit_ins(msg: Message, parameters: Parameters, names: list[str]) -> FitIns:
    """A Message-API training instruction as the legacy FitIns SecAgg+ sends.

    Legacy parameters are an unnamed list: the array names travel in the config (common.secure).
    """
    config = cast(dict[str, Scalar], dict(msg.content.config_records[_CONFIG]))
    config[ARRAY_NAMES] = ",".join(names)
    return FitIns(parameters, config)


def _site_reply(res: FitRes, dtypes: dict[str, np.dtype[Any]]) -> RecordDict:
    """A site's FitRes (the unmasked mean as its parameters) as a Message-API training reply.

    The inverse of `client.secure`'s flattening: the site's name, privacy report and audit head
    go back to the records a plain reply carries them in.
    """
    metrics: dict[str, Any] = {}
    privacy: dict[str, Any] = {}
    for key, value in res.metrics.items():
        if key.startswith(PRIVACY_PREFIX):
            privacy[key[len(PRIVACY_PREFIX):]] = value
        elif (key != SITE_NAME and not key.startswith(METRIC_PREFIX)
              and isinstance(value, int | float) and not isinstance(value, bool)):
            metrics[key] = value
    content = RecordDict({
        _ARRAYS: ArrayRecord({
            name: Array(np.asarray(mean, dtype=dtype)) for (name, dtype), mean in
            zip(dtypes.items(), parameters_to_ndarrays(res.parameters), strict=True)
        }),
        "metrics": MetricRecord(metrics),
        "site": ConfigRecord({"name": str(res.metrics[SITE_NAME])}),
    })
    if privacy:
        content["privacy"] = ConfigRecord(privacy)
    head = head_in_metrics(res.metrics)
    if head is not None:
        content[HEAD_RECORD] = ConfigRecord(head)
    return content


class _WatchedGrid(Delegating):
    """The grid the SecAgg+ stages talk to, noting which site failed, went silent or is whom.

    Flower's workflow keeps a failure as `Exception(error)`, which no longer says whose it was.
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.errors: dict[int, Message] = {}
        self.silent: set[int] = set()
        self.names: dict[int, str] = {}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send through `grid`; note error replies and sites that did not answer."""
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        answered = {r.metadata.src_node_id for r in replies}
        self.silent |= {m.metadata.dst_node_id for m in messages} - answered
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.errors.setdefault(node, reply)
                continue
            metrics = reply.content.config_records.get(_FIT_METRICS)
            if metrics is not None and SITE_NAME in metrics:  # its masked vector's reply
                self.names[node] = str(metrics[SITE_NAME])
        return replies


class _RoundCollector(LegacyStrategy):
    """The legacy strategy SecAgg+ drives for one round.

    It hands out the round's instructions and keeps what the unmask stage passes back: each
    site's FitRes, holding the unmasked mean.
    """

    def __init__(self, instructions: list[tuple[ClientProxy, FitIns]]) -> None:
        self.instructions = instructions
        self.results: list[tuple[ClientProxy, FitRes]] | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Unused: the global model is `server.run`'s."""
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The sites the run's strategy sampled, with its instructions."""
        return self.instructions

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Keep the results; the run's strategy aggregates them (failures are watched)."""
        self.results = results
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Unused: evaluation goes through the run's strategy."""
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Unused."""
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Unused: central evaluation is `server.run`'s."""
        return None
