"""Two fixes to Flower 1.41's simulation engine for federations of hundreds of sites.

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
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Any

import flwr
from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkState, LinkStateFactory
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

log = logging.getLogger(__name__)
# the module (the package's `run_simulation` attribute is the function of that name)
flwr_run_simulation: Any = importlib.import_module("flwr.simulation.run_simulation")

POLL_S = 0.01
# the Flower release whose internals this module was written against (pyproject pins it)
FLOWER_VERSION = "1.41.0"


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

    Yields whether the fixes are on: they are written against Flower `FLOWER_VERSION`'s
    internals, and another release runs unchanged (with a warning).
    """
    if flwr.__version__ != FLOWER_VERSION:
        log.warning(
            "Flower %s: the simulation delivery fixes target %s and are off; large federations "
            "will spend more CPU in the driver", flwr.__version__, FLOWER_VERSION,
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
