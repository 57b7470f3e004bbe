"""The delivery sweep delivers what Flower's does, asking the state only about waiting nodes."""

import importlib
import threading
from collections import Counter
from queue import Queue

import flwr
import pytest
from flwr.app import Message, RecordDict
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
from flwr.server.superlink.linkstate.linkstate_factory import LinkStateFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.federation.noop_federation_manager import NOOP_FEDERATION_ID

from common.flower_compat import delivery
from common.flower_compat.delivery import PromptGrid, add_messages_to_queue, prompt_delivery

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower Messages outside a run

MAPPING = {node: i for i, node in enumerate(range(1, 1001))}  # 1,000 virtual sites
WAITING = [5, 7, 7, 900, 4242]  # node 7 has two messages; 4242 is not a site of this run


class Sweeps(threading.Event):
    """A stop event that is set after `n` sweeps (each sweep ends with one wait)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    def wait(self, timeout: float | None = None) -> bool:
        self.left -= 1
        if self.left <= 0:
            self.set()
        return self.is_set()


def _state() -> InMemoryLinkState:
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state = factory.state()
    assert isinstance(state, InMemoryLinkState)
    run = Run.create_empty(run_id=1)
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[1] = RunRecord(run=run)
    for i, node in enumerate(WAITING):
        state.message_ins_store[f"m{i}"] = Message(
            RecordDict(), dst_node_id=node, message_type="train"
        )
    return state


def _sweep(sweep_fn, state: InMemoryLinkState, sweeps: int) -> list[int]:
    queue: Queue[Message] = Queue()
    sweep_fn(state, queue, MAPPING, Sweeps(sweeps))
    return [queue.get_nowait().metadata.dst_node_id for _ in range(queue.qsize())]


@pytest.mark.parametrize("sweeps", [1, 2, 3])
def test_delivers_exactly_what_flowers_sweep_delivers(sweeps: int) -> None:
    theirs_state, ours_state = _state(), _state()
    theirs = _sweep(vce_api.add_messages_to_queue, theirs_state, sweeps)
    ours = _sweep(add_messages_to_queue, ours_state, sweeps)
    assert Counter(ours) == Counter(theirs)
    # one message per node per sweep: node 7's second message waits for the next sweep
    assert Counter(ours) == Counter([5, 7, 900] + [7] * (sweeps > 1))
    for state in (theirs_state, ours_state):
        delivered = {k for k, m in state.message_ins_store.items() if m.metadata.delivered_at}
        assert delivered == ({"m0", "m1", "m3"} | ({"m2"} if sweeps > 1 else set()))


def test_asks_the_state_only_about_nodes_with_a_message_waiting(monkeypatch) -> None:
    asked: list[int] = []
    _sweep(add_messages_to_queue, _state_with(monkeypatch, asked), 1)
    assert sorted(asked) == [5, 7, 900]  # not 1,000 nodes, and not the stranger 4242
    asked.clear()
    _sweep(vce_api.add_messages_to_queue, _state_with(monkeypatch, asked), 1)
    assert len(asked) == len(MAPPING)  # Flower's own sweep: every node, every 0.1 s


def _state_with(monkeypatch, asked: list[int]) -> InMemoryLinkState:
    state = _state()
    real = state.get_message_ins

    def counting(node_id: int, limit: int | None, **kwargs):
        asked.append(node_id)
        return real(node_id=node_id, limit=limit, **kwargs)

    monkeypatch.setattr(state, "get_message_ins", counting)
    return state


def test_prompt_delivery_applies_for_the_block_only(monkeypatch, caplog) -> None:
    module = importlib.import_module("flwr.simulation.run_simulation")
    original_sweep, original_grid = vce_api.add_messages_to_queue, module.InMemoryGrid
    with prompt_delivery() as on:
        assert on
        assert vce_api.add_messages_to_queue is add_messages_to_queue
        assert module.InMemoryGrid is PromptGrid
        factory = LinkStateFactory(
            FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
        )
        assert PromptGrid(state_factory=factory).pull_interval == delivery.POLL_S
    assert vce_api.add_messages_to_queue is original_sweep
    assert module.InMemoryGrid is original_grid

    # a speed-up only: on a release it was not checked against, Flower's engine runs as it is
    monkeypatch.setattr(flwr, "__version__", "1.99.0")
    with prompt_delivery() as on:
        assert not on
        assert vce_api.add_messages_to_queue is original_sweep
    assert "Flower 1.99.0 is installed" in caplog.text and "delivery speed-up is off" in caplog.text
