"""A resumed FedAdam/FedYogi/FedAdagrad continues from the moments saved in the checkpoint."""

from typing import cast

import flwr
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedYogi, Strategy

from common.flower_compat import FlowerVersionError
from common.flower_compat.strategy_state import restore_strategy_state, strategy_state

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower Messages outside a run

OPTIMISERS = [FedAdam, FedYogi, FedAdagrad]


class _Nodes:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def _round(strategy: Strategy, server_round: int, model: np.ndarray) -> np.ndarray:
    """One round in which the two sites move the model by fixed, round-dependent steps."""
    sent = list(strategy.configure_train(
        server_round, ArrayRecord({"w": Array(model)}), ConfigRecord(), cast(Grid, _Nodes())
    ))
    replies = [
        Message(RecordDict({
            "arrays": ArrayRecord({"w": Array(model + (i + 1) * 0.1 * server_round)}),
            "metrics": MetricRecord({"num-examples": 10}),
        }), reply_to=request)
        for i, request in enumerate(sent)
    ]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert arrays is not None
    return arrays["w"].numpy()


@pytest.mark.parametrize("cls", OPTIMISERS)
def test_a_resumed_optimiser_continues_exactly(cls: type) -> None:
    start = np.zeros(4, np.float32)
    through = cls(min_available_nodes=2)
    model = start
    for server_round in (1, 2, 3):
        model = _round(through, server_round, model)

    first = cls(min_available_nodes=2)
    halfway = _round(first, 2, _round(first, 1, start))
    saved = strategy_state(first)
    assert {"m_t/w", "current_arrays/w"} <= set(saved)  # where Flower keeps the moments
    resumed = cls(min_available_nodes=2)
    restore_strategy_state(resumed, saved)
    np.testing.assert_array_equal(_round(resumed, 3, halfway), model)

    forgetful = cls(min_available_nodes=2)  # without the saved state: another model
    assert not np.allclose(_round(forgetful, 3, halfway), model)


def test_a_stateless_strategy_saves_nothing_and_a_wrong_one_is_named() -> None:
    assert strategy_state(FedAvg()) == {}
    with pytest.raises(ValueError, match="FedAvg lacks; resume with the strategy"):
        restore_strategy_state(FedAvg(), {"m_t/w": np.zeros(2)})


def test_an_unchecked_flower_release_saves_no_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    with pytest.raises(FlowerVersionError, match="Flower 9.9.9 is installed.*fedopt.py"):
        strategy_state(FedAdam())
    with pytest.raises(FlowerVersionError):
        restore_strategy_state(FedAdam(), {"m_t/w": np.zeros(2)})
    restore_strategy_state(FedAdam(), {})  # a fresh run restores nothing: no Flower involved
