"""How medfed's processes log: timestamped lines, and known warnings explained once.

Every medfed process (the CLI, a site's SuperNode supervisor, the ClientApp processes Flower
starts, Ray's simulation workers) logs `TIME LEVEL LOGGER: message`. Opacus warns about two
things medfed has decided deliberately, once per round and in words that suggest a mistake:

- "Secure RNG turned off": Opacus's secure mode needs torchcsprng, which is unmaintained. medfed
  seeds each round's noise generator from the operating system's entropy instead
  (common/training/loop.py), so the aggregator, which knows the run's seed, cannot regenerate
  the noise.
- "Optimal order is the largest/smallest alpha": the RDP accountant's bound is loosest at the
  ends of its alpha range. At the epsilons medfed plans for (about 1 to 10) the reported epsilon
  is still an upper bound, only not the tightest; the guarantee holds.

They are silenced and explained in one log line per process tree: the explanation sets an
environment variable that child processes inherit, so a ClientApp process Flower starts for each
message does not repeat it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
EXPLAINED_ENV = "MEDFED_WARNINGS_EXPLAINED"
OPACUS_ROOT_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"

# (start of the warning's message as a regular expression, why medfed accepts it)
KNOWN_WARNINGS: tuple[tuple[str, str], ...] = (
    (
        r"Secure RNG turned off",
        "Opacus's 'Secure RNG turned off' warning is silenced: medfed seeds DP-SGD noise from the "
        "operating system's entropy each round (common/training/loop.py), so no one who knows the "
        "run's "
        "seed can regenerate it",
    ),
    (
        r"Optimal order is the (largest|smallest) alpha",
        "Opacus's 'Optimal order is the largest alpha' warning is silenced: at the epsilons medfed "
        "plans for, the RDP bound it reports is still a valid upper bound, only not the tightest",
    ),
)


class _Handler(logging.StreamHandler):
    """medfed's own stderr handler (told apart from others so it is added once)."""


def configure(level: int = logging.INFO, *, explain: bool = True) -> None:
    """Make medfed's loggers (`medfed.*`) write timestamped lines to stderr; known warnings settled.

    The handler goes on the `medfed` logger unless the root logger already has one (a test's
    log capture, an embedding program): Flower's own logger propagates to the root, so a root
    handler here would print each of Flower's lines twice. Calling it again changes nothing.
    """
    _drop_opacus_root_handler()
    logger = logging.getLogger("medfed")
    logger.setLevel(level)
    if not logging.getLogger().handlers and not any(
        isinstance(h, _Handler) for h in logger.handlers
    ):
        handler = _Handler()
        handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        logger.addHandler(handler)
    settle_known_warnings(logger.info if explain else None)


def _drop_opacus_root_handler() -> None:
    # Opacus calls logging.basicConfig when imported (opacus/utils/module_utils.py): its root
    # handler prints every line of Flower's logger (which propagates) a second time, in its own
    # format, and would print medfed's twice too.
    root = logging.getLogger()
    for handler in list(root.handlers):
        formatter = handler.formatter
        if type(handler) is logging.StreamHandler and formatter and (
            formatter._fmt == OPACUS_ROOT_FORMAT
        ):
            root.removeHandler(handler)


def settle_known_warnings(say: Callable[[str], None] | None) -> None:
    """Silence KNOWN_WARNINGS in this process; `say` why, once per process tree."""
    for pattern, _ in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if say is None or os.environ.get(EXPLAINED_ENV) == "1":
        return
    os.environ[EXPLAINED_ENV] = "1"  # inherited by the processes started from here on
    for _, why in KNOWN_WARNINGS:
        say(why)
