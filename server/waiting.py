"""Waiting for the sites a deployed run needs: out loud, and not for ever.

Flower's strategies wait for `min_available_nodes` inside their first round, logging at DEBUG
level where `medfed run` does not look, and without a limit: an operator whose sites never came
saw "Successfully started run" for 13 minutes and nothing else. Before round 1 the ServerApp
waits here instead, saying every few seconds how many sites are connected against --min-sites,
and ends the run after --wait-timeout seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.serverapp import Grid

# `medfed run` shows the ServerApp's log lines that carry these marks (server.submit)
WAITING_MARK = "medfed waiting"
GAVE_UP_MARK = "medfed gave up"
SAY_EVERY_S = 5.0
POLL_S = 1.0


class SitesMissing(RuntimeError):
    """Fewer sites than --min-sites connected within --wait-timeout; the message says so."""


def wait_for_sites(
    grid: Grid,
    *,
    min_sites: int,
    timeout: float,
    say: Callable[[str], None],
    every: float = SAY_EVERY_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Return how many sites are connected once at least `min_sites` are.

    Says a waiting line every `every` seconds while too few are connected; raises SitesMissing
    (after saying why, with GAVE_UP_MARK) when `timeout` seconds pass first.
    """
    started = clock()
    said_at: float | None = None
    while True:
        connected = len(list(grid.get_node_ids()))
        now = clock()
        waited = now - started
        if connected >= min_sites:
            if said_at is not None:
                say(f"{WAITING_MARK}: {connected} sites connected after {waited:.0f}s; starting")
            return connected
        if waited >= timeout:
            message = (
                f"{GAVE_UP_MARK}: {connected} of {min_sites} sites (--min-sites) connected within "
                f"{timeout:g}s (--wait-timeout); the run is stopped. Start the missing sites "
                "(`medfed site --kit ... --data ...` at each hospital; a site's own log says why "
                "it cannot connect), or run with a smaller --min-sites or a longer --wait-timeout"
            )
            say(message)
            raise SitesMissing(message)
        if said_at is None or now - said_at >= every:
            say(
                f"{WAITING_MARK}: {connected} of {min_sites} sites (--min-sites) connected; "
                f"waited {waited:.0f}s of {timeout:g}s (--wait-timeout)"
            )
            said_at = now
        sleep(min(POLL_S, max(0.0, timeout - waited)))
