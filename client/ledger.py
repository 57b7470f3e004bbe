"""The site's privacy budget ledger: epsilon spent per dataset, across rounds and across runs.

A run's own accounting (common.privacy) stops at the end of the run; the ledger does not. It keeps
every DP-SGD step ever taken on a dataset (each run's Opacus accountant history) in one JSON file
on the site's disk, and its epsilon is that of one RDP accountant over all of those steps: RDP
composes exactly by concatenating histories, so spending across runs is never understated and
never summed loosely. Before a round, the site asks the ledger what the round would cost; when it
would take the dataset past the hospital's budget, the round is refused.

Where: `$MEDFED_LEDGER_DIR`, else `~/.medfed/ledger`, one file per dataset (the resolved path
of the site folder; the file names it). Nothing of it ever leaves the site.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.privacy import REFUSAL_MARK, Step, epsilon_of

ACCOUNTANT = "rdp"  # the ledger composes in RDP whatever accountant each run reported with
DEFAULT_DELTA = 1e-5
ENV = "MEDFED_LEDGER_DIR"


class BudgetRefused(RuntimeError):
    """A round would take the dataset past its budget; the message says by how much."""


def default_dir() -> Path:
    """$MEDFED_LEDGER_DIR, else ~/.medfed/ledger."""
    return Path(os.environ.get(ENV) or Path.home() / ".medfed" / "ledger")


def dataset_key(data_dir: Path, subset: str = "") -> str:
    """The ledger's name for a dataset: its site folder, resolved (and the part of it, if any)."""
    folder = str(data_dir.resolve())
    return f"{folder}#{subset}" if subset else folder


@dataclass
class DatasetLedger:
    """Everything spent on one dataset."""

    dataset: str
    budget_epsilon: float | None = None
    delta: float = DEFAULT_DELTA
    runs: dict[str, list[Step]] = field(default_factory=dict)

    def history(
        self, *, replace_run: str | None = None, with_: list[Step] | None = None
    ) -> list[Step]:
        """All steps of all runs; `replace_run`'s steps swapped for `with_` when given."""
        steps: list[Step] = []
        for run, hist in sorted(self.runs.items()):
            if run != replace_run:
                steps += [tuple(s) for s in hist]  # type: ignore[misc]
        if replace_run is not None and with_ is not None:
            steps += with_
        return steps

    def spent(self) -> float:
        """Epsilon spent on this dataset over every run (RDP over all steps)."""
        return epsilon_of(self.history(), delta=self.delta, accountant=ACCOUNTANT)

    def to_dict(self) -> dict[str, Any]:
        """What `medfed site budget --json` prints."""
        return {
            "dataset": self.dataset,
            "epsilon_spent": self.spent(),
            "budget_epsilon": self.budget_epsilon,
            "delta": self.delta,
            "runs": {run: sum(int(n) for *_, n in hist) for run, hist in self.runs.items()},
        }


class PrivacyLedger:
    """The ledger file of one dataset, read and written under an exclusive lock."""

    def __init__(
        self, data_dir: Path, ledger_dir: Path | None = None, *, subset: str = ""
    ) -> None:
        self.dataset = dataset_key(data_dir, subset)
        folder = ledger_dir or default_dir()
        digest = hashlib.sha256(self.dataset.encode()).hexdigest()[:16]
        self.path = folder / f"{digest}.json"

    def read(self) -> DatasetLedger:
        """The ledger as on disk (empty when the dataset was never trained on)."""
        if not self.path.is_file():
            return DatasetLedger(self.dataset)
        raw = json.loads(self.path.read_text())
        return DatasetLedger(
            dataset=raw["dataset"],
            budget_epsilon=raw.get("budget_epsilon"),
            delta=float(raw.get("delta", DEFAULT_DELTA)),
            runs={
                k: [(float(s), float(q), int(n)) for s, q, n in v] for k, v in raw["runs"].items()
            },
        )

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, ledger: DatasetLedger) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ledger-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(
                {"dataset": ledger.dataset, "budget_epsilon": ledger.budget_epsilon,
                 "delta": ledger.delta, "runs": ledger.runs},
                fh, indent=2,
            )
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def check_round(
        self, *, run: str, history_after: list[Step], budget: float, site: str
    ) -> float:
        """Epsilon on this dataset if the round runs; raises BudgetRefused past `budget`.

        `history_after` is the run's accountant history as it would be after the round.
        """
        with self._locked():
            ledger = self.read()
            ledger.budget_epsilon = budget
            before = ledger.spent()
            after = epsilon_of(
                ledger.history(replace_run=run, with_=history_after),
                delta=ledger.delta, accountant=ACCOUNTANT,
            )
            self._write(ledger)  # the budget it was held to, refused or not
            if after > budget:
                raise BudgetRefused(
                    f"{REFUSAL_MARK}: site {site} has spent epsilon {before:.3f} of its budget "
                    f"{budget:g} on this dataset (all runs); this round would take it to "
                    f"{after:.3f}. The hospital decides whether to raise the budget "
                    "(`medfed site --budget-epsilon`)"
                )
            return after

    def commit(self, *, run: str, history: list[Step], budget: float | None) -> float:
        """Record the run's history after a round (it only grows); returns the dataset's epsilon."""
        with self._locked():
            ledger = self.read()
            if budget is not None:
                ledger.budget_epsilon = budget
            old = sum(int(n) for *_, n in ledger.runs.get(run, []))
            if sum(int(n) for *_, n in history) < old:
                raise ValueError("a run's history shrank: refusing to forget spent privacy budget")
            ledger.runs[run] = [(float(s), float(q), int(n)) for s, q, n in history]
            self._write(ledger)
            return ledger.spent()
