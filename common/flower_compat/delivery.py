"""Two fixes to Flower's simulation engine for federations of hundreds of sites.

Both keep Flower's engine, its link state and its delivery rules; they change how often and how
widely it looks for work. `prompt_delivery()` applies them for the length of one simulation.

1. The delivery sweep. The engine's delivery thread (`vce_api.add_messages_to_queue`) asks the
   link state, every 0.1 s, for one undelivered message per connected node. With N nodes and P
   messages in the state, each sweep runs N * P message checks under the state's lock, whether
   or not a node has anything waiting: at 1,000 sites with 20 in flight, a quarter of the whole
   run's samples in the driver (py-spy over `scale-1000.toml`), on the same two cores the sites
   train on. The replacement asks the state only for the nodes that have an undelivered
   message, through the same `get_message_ins` call (which validates, expires and marks
   messages delivered as before), one message per node per sweep as before.
2. Polling. New messages are swept and replies pulled every 0.1 s, so a round can idle up to
   0.2 s between its site's work. With the sweep cheap, both poll every `POLL_S`.

Evidence: `flwr/server/superlink/fleet/vce/vce_api.py` (`add_messages_to_queue`: for every
node, `state.get_message_ins(node_id=node_id, limit=1)`, then `f_stop.wait(0.1)`) and
`flwr/simulation/run_simulation.py` (builds `InMemoryGrid(state_factory=...)` with its default
`pull_interval` of 0.1 s). No Flower issue tracks the sweep's cost; the profile is medfed's own.
Gate: a speed-up only (the tests show it delivers what Flower's sweep delivers), so on a Flower
release it was not checked against the simulation warns and runs with Flower's engine unchanged.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Any

from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkState, LinkStateFactory
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from common.flower_compat import Gate

log = logging.getLogger(__name__)
# the module (the package's `run_simulation` attribute is the function of that name)
flwr_run_simulation: Any = importlib.import_module("flwr.simulation.run_simulation")

POLL_S = 0.01
GATE = Gate(
    patch="the simulation's delivery speed-up",
    flower_code="flwr/server/superlink/fleet/vce/vce_api.py (add_messages_to_queue) and "
                "flwr/simulation/run_simulation.py (InMemoryGrid)",
    test="tests/common/flower_compat/test_delivery.py",
)


def waiting_nodes(state: LinkState) -> set[int]:
    """The nodes that have at least one undelivered message in `state`."""
    assert isinstance(state, InMemoryLinkState)
    with state.lock:
        return {
            m.metadata.dst_node_id
            for m in state.message_ins_store.values()
            if m.metadata.delivered_at == ""
        }


def add_messages_to_queue(
    state: LinkState, queue: Queue[Message], nodes_mapping: dict[int, int],
    f_stop: threading.Event,
) -> None:
    """`vce_api.add_messages_to_queue`, visiting only the nodes that have a message waiting."""
    while not f_stop.is_set():
        for node_id in sorted(waiting_nodes(state) & nodes_mapping.keys()):
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(POLL_S)


class PromptGrid(InMemoryGrid):
    """Flower's in-memory grid, pulling replies every `POLL_S`."""

    def __init__(self, state_factory: LinkStateFactory, pull_interval: float = POLL_S) -> None:
        super().__init__(state_factory, pull_interval=pull_interval)


@contextmanager
def prompt_delivery() -> Iterator[bool]:
    """Within the block, Flower's simulation engine delivers as this module describes.

    Yields whether the fixes are on: on a Flower release `GATE` was not checked against, the
    engine runs unchanged, with a warning.
    """
    if not GATE.holds():
        log.warning(
            "%s The delivery speed-up is off for this run: large federations will spend more "
            "CPU in the driver", GATE.problem(),
        )
        yield False
        return
    saved = (vce_api.add_messages_to_queue, flwr_run_simulation.InMemoryGrid)
    vce_api.add_messages_to_queue = add_messages_to_queue
    flwr_run_simulation.InMemoryGrid = PromptGrid
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue, flwr_run_simulation.InMemoryGrid = saved
