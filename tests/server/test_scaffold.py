"""SCAFFOLD at the aggregator: c travels with the model, moves by the sites' delta c_i."""

from typing import cast

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.config import RunConfig
from common.flower_compat.strategy_state import restore_strategy_state, strategy_state
from common.scaffold import CONTROL_PREFIX, split_control, with_control
from server.scaffold import Scaffold
from server.strategies import build_strategy


class _Nodes:
    """The one Grid method FedAvg.configure_train needs: which nodes are connected."""

    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})


def _reply(request: Message, arrays: dict[str, np.ndarray], n: int) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": n}),
    })
    return Message(content, reply_to=request)


MODEL = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([0.5], np.float32)}


def _round(strategy: FedAvg, nodes: int, updates: list[dict[str, np.ndarray]],
           sizes: list[int]) -> tuple[list[Message], ArrayRecord]:
    sent = list(strategy.configure_train(1, _arrays(MODEL), ConfigRecord(),
                                         cast(Grid, _Nodes(nodes))))
    replies = [_reply(q, u, n) for q, u, n in zip(sent, updates, sizes, strict=False)]
    aggregated, _ = strategy.aggregate_train(1, replies)
    assert aggregated is not None
    return sent, aggregated


def test_scaffold_is_built_by_name_and_refused_where_it_cannot_work() -> None:
    assert isinstance(build_strategy(RunConfig(strategy="scaffold")), Scaffold)
    with pytest.raises(ValueError, match="strategy"):
        RunConfig(strategy="scaffold", task="synthesize")
    with pytest.raises(ValueError, match="fedavg or fedprox with --central-dp or --secure-agg"):
        RunConfig(strategy="scaffold", secure_agg=True)


def test_with_zero_control_variates_a_round_is_fedavg() -> None:
    rng = np.random.default_rng(0)
    models = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in MODEL.items()}
              for _ in range(3)]
    zero = {k: np.zeros_like(v) for k, v in MODEL.items()}
    sizes = [10, 30, 60]
    sent, scaffold = _round(Scaffold(), 3, [with_control(m, zero) for m in models], sizes)
    _, fedavg = _round(FedAvg(), 3, models, sizes)
    model, control = split_control({k: v.numpy() for k, v in sent[0].content["arrays"].items()})
    assert set(model) == set(MODEL) and all(np.all(c == 0) for c in control.values())
    assert set(scaffold.keys()) == set(MODEL)  # the control never reaches the global model
    for name in MODEL:
        np.testing.assert_allclose(scaffold[name].numpy(), fedavg[name].numpy(), rtol=1e-6)


def test_c_moves_by_the_replying_share_of_the_weighted_mean_delta() -> None:
    strategy = Scaffold()
    deltas = [{"w": np.array([1.0, 0.0], np.float32), "b": np.array([2.0], np.float32)},
              {"w": np.array([3.0, 4.0], np.float32), "b": np.array([0.0], np.float32)}]
    # 4 sites available, 2 reply (weights 1 and 3): c = 2/4 * (1*d1 + 3*d2) / 4
    updates = [with_control(MODEL, d) for d in deltas]
    _round(strategy, 4, updates, [1, 3])
    np.testing.assert_allclose(strategy.control["w"], [0.5 * 2.5, 0.5 * 3.0])
    np.testing.assert_allclose(strategy.control["b"], [0.5 * 0.5])
    sent = list(strategy.configure_train(2, _arrays(MODEL), ConfigRecord(),
                                         cast(Grid, _Nodes(4))))
    _, control = split_control({k: v.numpy() for k, v in sent[0].content["arrays"].items()})
    np.testing.assert_allclose(control["w"], strategy.control["w"])
    assert all(k.startswith(CONTROL_PREFIX) or k in MODEL for k in sent[0].content["arrays"])


def test_checkpoint_keeps_c() -> None:
    strategy = Scaffold(min_available_nodes=1, min_train_nodes=1)
    updates = [with_control(MODEL, {"w": np.ones(2, np.float32), "b": np.ones(1, np.float32)})]
    _round(strategy, 1, updates, [5])
    resumed = Scaffold()
    restore_strategy_state(resumed, strategy_state(strategy))
    np.testing.assert_array_equal(resumed.control["w"], strategy.control["w"])
