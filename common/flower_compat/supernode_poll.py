"""The SuperNode's waits: a site asks for the next message and sends its reply promptly.

Flower's SuperNode loop (`flwr/supernode/start_client_internal.py`, `start_client_internal`)
sleeps a fixed 3 s whenever the SuperLink has no message for it, and `_push_messages` looks for
the ClientApp's reply every 0.5 s. Both waits are hard-coded (no flag, no environment variable;
Flower's request for a long-lived ClientApp, flwrlabs/flower#3670, is still open). Every round
of a deployed run starts with the aggregator's message, which the site then finds up to 3 s
late, and ends with the reply, sent up to 0.5 s late: measured here as about 2 s of each round's
overhead (bench/deploy.py), more than the rest of the round's handling.

`main()` runs Flower's own `flower-supernode` entry point with that module's `time` replaced by
one whose `sleep` asks again `FAST_POLL_S` after the site's last message, backing off to
`IDLE_POLL_S` (`medfed site --poll-interval`) while nothing comes, and looks for a reply every
`REPLY_POLL_S`; every other `time` function is the real one. `medfed site` starts its SuperNode
through it. A long-idle site asks every 2 s instead of every 3 s; for a few seconds after each
message it asks every 0.25 s and more, so the next round's message is picked up within a
fraction of a second. Faster asks cost more than they save on a small machine: each is a
request the SuperLink serves with several database statements, on the CPUs the sites train on
(bench/deploy.py: first asks 0.05 s apart gave 3.0 s of overhead a round, 0.25 s gave 2.3 s).

The same loop pulls a message's objects with Flower's `pull_objects`, which retries an object
the SuperLink does not hold yet after 1 s, then 2 s: it is given `RETRY_S` and `RETRY_CAP_S`.

Gate: it replaces a module attribute of Flower's, so on a Flower release it was not checked
against the SuperNode runs unchanged, with a warning (a speed-up only).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from types import ModuleType
from typing import Any

from common.flower_compat import Gate

log = logging.getLogger(__name__)

IDLE_POLL_S = 2.0  # the longest idle wait, unless POLL_ENV says otherwise (`--poll-interval`)
FAST_POLL_S, BACKOFF = 0.25, 1.25  # the first wait after a message, and its growth
POLL_ENV = "MEDFED_SUPERNODE_POLL_S"
REPLY_POLL_S = 0.02
RETRY_S, RETRY_CAP_S = 0.02, 0.5
GATE = Gate(
    patch="the SuperNode's shorter waits",
    flower_code="flwr/supernode/start_client_internal.py (start_client_internal's "
                "time.sleep(3), _push_messages' time.sleep(0.5))",
    test="tests/common/flower_compat/test_supernode_poll.py",
)


class PromptTime:
    """The `time` module, with shorter sleeps."""

    def __init__(self, real: ModuleType = time, idle: float = IDLE_POLL_S) -> None:
        self._real = real
        self._idle = idle
        self._next = FAST_POLL_S

    def sleep(self, seconds: float) -> None:
        """Flower's 3 s idle wait and its 0.5 s wait for the ClientApp's reply, shortened.

        Idle (3 s): FAST_POLL_S after the site's last message, growing by BACKOFF to the idle
        ceiling, since the next round's message usually follows within a second or two. A reply
        wait (a message is being handled) is REPLY_POLL_S and starts the fast polls again.
        """
        if seconds >= 3:
            wait = self._next
            self._next = min(self._next * BACKOFF, self._idle)
        else:
            wait = min(seconds, REPLY_POLL_S)
            self._next = FAST_POLL_S
        self._real.sleep(wait)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def prompt_supernode() -> bool:
    """Shorten the SuperNode loop's waits in this process; False on an unchecked Flower."""
    if not GATE.holds():
        log.warning("%s; the SuperNode polls at Flower's own pace", GATE.problem())
        return False
    from flwr.supernode import start_client_internal as loop

    idle = float(os.environ.get(POLL_ENV, IDLE_POLL_S))
    loop.time = PromptTime(idle=idle)  # type: ignore[assignment]
    # a message whose objects the SuperLink does not hold yet: retry within RETRY_S, not 1 s
    loop.pull_objects = functools.partial(
        loop.pull_objects, initial_backoff=RETRY_S, backoff_cap=RETRY_CAP_S)
    return True


def main() -> None:
    """`flower-supernode` with prompt waits (argv as Flower's command takes it)."""
    prompt_supernode()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()
