"""Grids around the one Flower gives the ServerApp: each changes how rounds reach the sites.

- `Delegating`: hands every call on; the others override `send_and_receive`.
- `PromptGrid`: packs each message's model arrays in one Array (common.packing) and picks
  up the sites' replies every `POLL_S`. Flower's deployed grid
  (`flwr/superlink/grid/http_grid.py`, `send_and_receive`) sleeps 3 s between pulls, so a
  deployed round ended up to 3 s after its last site replied.
- server.secure's `SecAggPlusGrid`: training rounds through SecAgg+.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from common.packing import pack, unpack

POLL_S = 0.15


class Delegating(Grid):
    """A Grid that hands every call to `grid`; subclasses change `send_and_receive`."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Delegated."""
        return self.grid.send_and_receive(messages, timeout=timeout)

    def set_run(self, run: Run) -> None:
        """Delegated."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """Delegated."""
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Delegated."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegated."""
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegated."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegated."""
        return self.grid.pull_messages(message_ids)


class PromptGrid(Delegating):
    """`grid` with prompt replies and packed arrays.

    Replies are pulled every POLL_S seconds; each message's model arrays travel packed in one
    Array (common.packing; the site's shim unpacks them).
    """

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push packed copies of `messages` (the strategy keeps its own, unpacked)."""
        return self.grid.push_messages([pack(m) for m in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that have arrived, unpacked."""
        return [unpack(m) for m in self.grid.pull_messages(message_ids)]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push `messages`; their replies, as they arrive, until all are in or `timeout`."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            arrived = list(self.pull_messages(waiting))
            replies.extend(arrived)
            waiting.difference_update(m.metadata.reply_to_message_id for m in arrived)
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(POLL_S)
        return replies
