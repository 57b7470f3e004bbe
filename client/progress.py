"""The site's own record of its training, kept in its state folder for its own exporter.

Each time the ClientApp trains or evaluates it appends one JSON line to
`STATE/progress.jsonl`: run, round, phase, seconds, loss, examples and privacy spend. Scalars
only, the same values its reply to the aggregator carries; no image, path or identifier. The
site's exporter (`medfed site --metrics-port`) reads it, because the ClientApp itself lives
only for one message, in a process of its own.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("medfed.client")

FILE = "progress.jsonl"


@dataclass(frozen=True)
class Progress:
    """One training or evaluation the site did."""

    run: str
    round: int
    phase: str  # "train" or "evaluate"
    seconds: float
    loss: float
    examples: int
    epsilon: float | None = None
    target_epsilon: float | None = None
    at: float = 0.0


def record(state_dir: Path, entry: Progress) -> None:
    """Append `entry`; a failure is logged, never raised (monitoring must not stop training)."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        stamped = {**asdict(entry), "at": entry.at or time.time()}
        with (state_dir / FILE).open("a") as f:
            f.write(json.dumps(stamped) + "\n")
    except OSError as exc:
        log.warning("could not record progress in %s: %s", state_dir, exc)


def read(state_dir: Path) -> list[Mapping[str, object]]:
    """Every entry recorded, oldest first; unreadable lines are skipped."""
    path = state_dir / FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries
