"""SCAFFOLD on Flower's FedAvg: the aggregator's half (common.scaffold, common.training.scaffold).

Flower 1.41 has no SCAFFOLD strategy. This one is FedAvg that also sends c (the mean of the
sites' control variates) with the model and updates it from the sites' delta c_i, which
FedAvg's own aggregation averages with the model (the same weights). With c and every c_i at
zero, a round is exactly FedAvg's.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.scaffold import split_control, with_control


class Scaffold(FedAvg):
    """FedAvg with SCAFFOLD's control variates (Karimireddy et al., ICML 2020).

    The server's step size is 1 (the paper's eta_g), so the model update is FedAvg's. `control`
    (c, by state-dict name) is a dict of arrays so that checkpoints save and restore it
    (common.flower_compat.strategy_state).
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.control: dict[str, np.ndarray] = {}
        self._sampled = 0
        self._available = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages, with c beside the model (zeros before the first round)."""
        model = {name: array.numpy() for name, array in arrays.items()}
        if not self.control:
            self.control = {
                name: np.zeros_like(value, dtype=np.float32)
                for name, value in model.items() if np.issubdtype(value.dtype, np.floating)
            }
        sent = ArrayRecord(
            {name: Array(np.asarray(value)) for name, value in
             with_control(model, self.control).items()}
        )
        messages = list(super().configure_train(server_round, sent, config, grid))
        self._sampled = len(messages)
        self._available = max(len(list(grid.get_node_ids())), self._sampled)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's mean of models and delta c_i; c moves by the replying share of the sites.

        c <- c + (|S| / N) * mean over S of delta c_i, as in the paper with N the sites
        available this round and S those that replied.
        """
        replies = list(replies)
        aggregated, metrics = super().aggregate_train(server_round, replies)
        if aggregated is None:
            return None, metrics
        model, delta = split_control({k: v.numpy() for k, v in aggregated.items()})
        replied = sum(1 for msg in replies if not msg.has_error())
        share = replied / self._available if self._available else 0.0
        for name, change in delta.items():
            if name in self.control:
                self.control[name] = (self.control[name] + share * change).astype(np.float32)
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in model.items()}), metrics
