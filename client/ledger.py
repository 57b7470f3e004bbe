"""The site's privacy budget ledger: epsilon spent on each image, across rounds and across runs.

A run's own accounting (common.privacy) stops at the end of the run; the ledger does not. It keeps
every DP-SGD step ever taken (each run's Opacus accountant history) and which images each run
trained on, in one JSON file on the site's disk. An image's epsilon is that of one RDP
accountant over the steps of every run that trained on it: RDP composes exactly by
concatenating histories, so spending across runs is never understated and never summed loosely.

Images are named by content (client.content: SHA-256 of the file), not by path: a hard link, a
copy or a renamed folder shares the spend of the images it holds, and so does a folder that
holds only some of them. A round is checked against the most-spent image it trains on, and its
cost is reserved in the ledger under the same lock as the check, before training: two runs
that train the same images at once can never both pass the check on the old spend, and a round
that fails part-way stays counted. A run without DP is recorded as unbounded (epsilon inf) on
every image it trained on, and is refused where a budget is set.

A virtual site of a simulation (a part of one pooled folder) is one key, the pool's content and
the part's name: its images all share one history.

Where: `$MEDFED_LEDGER_DIR`, else `~/.medfed/ledger`: `ledger.json`, its lock and the hash
cache. Nothing of it ever leaves the site. Ledgers of earlier medfed versions (one file per
folder path) are migrated onto the images of that folder the first time the ledger is opened.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.content import ContentHashes, dataset_keys
from common.atomic import atomic_open
from common.privacy import REFUSAL_MARK, Step, epsilon_of

ACCOUNTANT = "rdp"  # the ledger composes in RDP whatever accountant each run reported with
DEFAULT_DELTA = 1e-5
ENV = "MEDFED_LEDGER_DIR"
LEDGER_FILE = "ledger.json"
FORMAT = "medfed-ledger/2"
# an earlier medfed's ledger: one file per dataset path, named by 16 hex digits of its hash
_LEGACY = re.compile(r"^[0-9a-f]{16}\.json$")


class BudgetRefused(RuntimeError):
    """A round would take the dataset past its budget; the message says by how much."""


class LedgerError(ValueError):
    """The ledger file cannot be trusted (unreadable, truncated, wrong types): nothing trains."""


def default_dir() -> Path:
    """$MEDFED_LEDGER_DIR, else ~/.medfed/ledger."""
    return Path(os.environ.get(ENV) or Path.home() / ".medfed" / "ledger")


@dataclass
class Spend:
    """One run's training at one site: its steps (None: no DP, unbounded) and what it trained."""

    history: list[Step] | None
    datasets: list[str] = field(default_factory=list)
    budget_epsilon: float | None = None

    def epsilon(self, delta: float) -> float:
        """Epsilon of this spend alone (inf without DP)."""
        if self.history is None:
            return math.inf
        return epsilon_of(self.history, delta=delta, accountant=ACCOUNTANT)


@dataclass
class Book:
    """The whole ledger file: spends, and the image keys of each dataset they trained on."""

    delta: float = DEFAULT_DELTA
    spends: dict[str, Spend] = field(default_factory=dict)
    datasets: dict[str, list[str]] = field(default_factory=dict)
    # the budget each dataset was last held to, refused or not; the latest last
    budgets: dict[str, float] = field(default_factory=dict)

    def hold_to(self, digest: str, budget: float | None) -> None:
        """Remember the budget a round on dataset `digest` was checked against."""
        if budget is not None:
            self.budgets.pop(digest, None)
            self.budgets[digest] = budget

    def budget_of(self, keys: Iterable[str]) -> float | None:
        """The budget a dataset sharing any of `keys` was held to most recently."""
        wanted = set(keys)
        held = [b for d, b in self.budgets.items() if wanted.intersection(self.datasets[d])]
        return held[-1] if held else None

    def spends_by_image(self, keys: Iterable[str]) -> dict[str, frozenset[str]]:
        """For each of `keys`, the spends that trained on it."""
        wanted = set(keys)
        found: dict[str, set[str]] = {k: set() for k in wanted}
        shared: dict[str, set[str]] = {}  # each dataset's keys among `keys`, worked out once
        for spend_id, spend in self.spends.items():
            for digest in spend.datasets:
                if digest not in shared:
                    shared[digest] = wanted.intersection(self.datasets.get(digest, ()))
                for key in shared[digest]:
                    found[key].add(spend_id)
        return {k: frozenset(v) for k, v in found.items()}

    def epsilon(self, spend_ids: Iterable[str], extra: Spend | None = None) -> float:
        """One RDP accountant over every step of these spends (and `extra`)."""
        spends = [self.spends[s] for s in spend_ids]
        if extra is not None:
            spends.append(extra)
        if any(s.history is None for s in spends):
            return math.inf
        return epsilon_of([step for s in spends for step in s.history or []],
                          delta=self.delta, accountant=ACCOUNTANT)

    def most_spent(self, keys: Iterable[str], *, replace: str | None = None,
                   with_: Spend | None = None) -> float:
        """Epsilon of the most-spent of `keys`; spend `replace` swapped for `with_` when given."""
        groups = set(self.spends_by_image(keys).values())
        if with_ is not None:  # every key is trained on by the new spend
            groups = {g - {replace} for g in groups} or {frozenset()}
        return max((self.epsilon(g, with_) for g in groups), default=0.0)

    def add_dataset(self, keys: list[str]) -> str:
        """The digest under which `keys` are stored (added when new)."""
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32]
        self.datasets.setdefault(digest, keys)
        return digest

    def to_json(self) -> dict[str, Any]:
        """The file's content."""
        return {
            "format": FORMAT,
            "delta": self.delta,
            "spends": {
                k: {"history": None if s.history is None else [list(x) for x in s.history],
                    "datasets": s.datasets, "budget_epsilon": s.budget_epsilon}
                for k, s in self.spends.items()
            },
            "datasets": self.datasets,
            "budgets": self.budgets,
        }


def _step(raw: Any) -> Step:
    sigma, q, n = raw
    step = (float(sigma), float(q), int(n))
    if not (math.isfinite(step[0]) and step[0] >= 0 and 0 < step[1] <= 1 and step[2] >= 0
            and float(n) == step[2]):
        raise ValueError(f"invalid DP-SGD step {raw!r}")
    return step


def _parse(raw: Any) -> Book:
    """The ledger from its JSON; ValueError/TypeError/KeyError on anything unexpected."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    delta = float(raw["delta"])
    if not 0 < delta < 1:
        raise ValueError(f"delta {delta!r}")
    datasets = {str(k): [str(x) for x in _list(v)] for k, v in _dict(raw["datasets"]).items()}
    spends: dict[str, Spend] = {}
    for key, value in _dict(raw["spends"]).items():
        entry = _dict(value)
        history = entry["history"]
        budget = entry.get("budget_epsilon")
        digests = [str(d) for d in _list(entry["datasets"])]
        unknown = [d for d in digests if d not in datasets]
        if unknown:
            raise ValueError(f"spend {key!r} names unknown dataset {unknown[0]!r}")
        spends[str(key)] = Spend(
            None if history is None else [_step(s) for s in _list(history)],
            digests, None if budget is None else float(budget),
        )
    budgets = {str(k): float(v) for k, v in _dict(raw.get("budgets", {})).items()}
    if any(d not in datasets for d in budgets):
        raise ValueError("a budget names an unknown dataset")
    return Book(delta, spends, datasets, budgets)


def _dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


@dataclass
class DatasetLedger:
    """What the ledger holds about one dataset (its images), for `medfed site budget`."""

    dataset: str
    images: int
    content: str
    budget_epsilon: float | None
    delta: float
    runs: dict[str, list[Step] | None]
    epsilon: float

    def spent(self) -> float:
        """Epsilon of the dataset's most-spent image over every run (inf: trained without DP)."""
        return self.epsilon

    def to_dict(self) -> dict[str, Any]:
        """What `medfed site budget --json` prints (inf as the string "inf": JSON has none)."""
        return {
            "dataset": self.dataset,
            "content_sha256": self.content,
            "images": self.images,
            "epsilon_spent": self.epsilon if math.isfinite(self.epsilon) else "inf",
            "budget_epsilon": self.budget_epsilon,
            "delta": self.delta,
            "runs": {
                run: ("unbounded (no DP)" if hist is None else sum(int(n) for *_, n in hist))
                for run, hist in self.runs.items()
            },
        }


class PrivacyLedger:
    """One dataset's view of the site's ledger, read and written under an exclusive lock.

    Args:
        data_dir: the site folder; its images (labels.csv's rows) are what is charged.
        split: the rows a round trains on ("train"); None: every row (what `site budget` shows).
        seed: decides the split of rows labels.csv leaves unsplit (the run's --seed).
        subset: a simulation's virtual site cut out of `data_dir`.

    """

    def __init__(
        self, data_dir: Path, ledger_dir: Path | None = None, *, subset: str = "",
        split: str | None = None, seed: int = 0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.subset = subset
        self.folder = ledger_dir or default_dir()
        self.path = self.folder / LEDGER_FILE
        self.hashes = ContentHashes(self.folder)
        self.keys = dataset_keys(self.data_dir, self.hashes, split=split, seed=seed,
                                 subset=subset)
        self.dataset = str(self.data_dir.resolve()) + (f"#{subset}" if subset else "")

    # --- the file -----------------------------------------------------------------------------

    def _book(self) -> Book:
        """The ledger as on disk (empty when there is none); LedgerError when untrustworthy."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return Book()
        except OSError as exc:
            raise self._corrupt(f"cannot be read ({exc.strerror or exc})") from None
        try:
            return _parse(json.loads(text))
        except (ValueError, TypeError, KeyError) as exc:
            raise self._corrupt(f"is damaged ({type(exc).__name__}: {exc})") from None

    def _corrupt(self, what: str) -> LedgerError:
        return LedgerError(
            f"{self.path}: the privacy ledger {what}. medfed trains nothing on an unknown spend: "
            "restore the file from the site's backup; if it is lost, the hospital must treat "
            "every dataset it covered as spent before moving it aside (it is never read as "
            "zero spent)"
        )

    @contextmanager
    def _locked(self, *, write: bool = True) -> Iterator[Book]:
        """The book under the lock; with `write`, what the caller changed is written back.

        An exception in the caller (a refusal) writes nothing of its changes.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "ledger.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                book = self._book()
                self._migrate_legacy(book)
                yield book
                if write:
                    self._write(book)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, book: Book) -> None:
        with atomic_open(self.path) as fh:
            json.dump(book.to_json(), fh)

    def _migrate_legacy(self, book: Book) -> None:
        """Fold an earlier medfed's per-path ledgers into the book, charged on their images.

        The book is written before the old files are renamed: a crash in between counts them
        twice, never zero times.
        """
        olds = sorted(p for p in self.folder.iterdir() if _LEGACY.match(p.name))
        for old in olds:
            try:
                raw = json.loads(old.read_text())
                dataset = str(raw["dataset"])
                runs = {str(k): [_step(s) for s in _list(v)] for k, v in _dict(raw["runs"]).items()}
                budget = raw.get("budget_epsilon")
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise LedgerError(
                    f"{old}: a privacy ledger of an earlier medfed that cannot be read "
                    f"({type(exc).__name__}: {exc}); restore it from the site's backup"
                ) from None
            folder, _, subset = dataset.partition("#")
            if not (Path(folder) / "labels.csv").is_file():
                raise LedgerError(
                    f"{old}: a privacy ledger of an earlier medfed, kept by folder path, for "
                    f"{folder}, which is gone: its spend cannot be tied to images. Put the "
                    "folder back and retry (medfed then charges its images), or move the file "
                    "aside if the hospital accepts that the spend is forgotten"
                )
            # every row, whatever split: the old ledger did not know which images trained
            keys = dataset_keys(Path(folder), self.hashes, split=None, subset=subset)
            digest = book.add_dataset(keys)
            book.hold_to(digest, None if budget is None else float(budget))
            for run, history in runs.items():
                book.spends[f"legacy:{run}@{dataset}"] = Spend(
                    history, [digest], None if budget is None else float(budget)
                )
        if olds:
            self._write(book)
        for old in olds:
            old.rename(old.with_name(old.name + ".migrated"))

    # --- reading ------------------------------------------------------------------------------

    def read(self) -> DatasetLedger:
        """What has been spent on this dataset's images (nothing when never trained on)."""
        with self._locked(write=False) as book:
            by_image = book.spends_by_image(self.keys)
            touching = sorted(set().union(*by_image.values())) if by_image else []
            return DatasetLedger(
                dataset=self.dataset, images=len(self.keys),
                content=hashlib.sha256("\n".join(self.keys).encode()).hexdigest(),
                budget_epsilon=book.budget_of(self.keys), delta=book.delta,
                runs={s: book.spends[s].history for s in touching},
                epsilon=book.most_spent(self.keys),
            )

    # --- spending -----------------------------------------------------------------------------

    def reserve_round(
        self, *, run: str, site: str, history: list[Step], this_round: Step,
        budget: float | None,
    ) -> float:
        """Check the round against `budget` and record its cost, under one lock; before training.

        `history` is the run's accountant history before the round. The run's spend becomes
        the larger of (what the ledger holds for it, or `history`) plus this round, so a round
        that failed after its reservation stays counted. Returns the most-spent image's epsilon
        with the round; raises BudgetRefused, recording nothing, when that exceeds `budget`.
        """
        spend_id = f"{run}@{site}"
        refusal: BudgetRefused | None = None
        with self._locked() as book:
            held = book.spends.get(spend_id)
            candidates = [history + [this_round]]
            if held is not None and held.history is not None:
                candidates.append(held.history + [this_round])
            steps = max(candidates, key=lambda h: epsilon_of(h, delta=book.delta,
                                                             accountant=ACCOUNTANT))
            digest = book.add_dataset(self.keys)
            datasets = sorted({*(held.datasets if held else []), digest})
            new = Spend(steps, datasets, budget)
            after = book.most_spent(self.keys, replace=spend_id, with_=new)
            book.hold_to(digest, budget)  # what the dataset was held to, refused or not
            if budget is not None and after > budget:
                before = book.most_spent(self.keys)
                refusal = BudgetRefused(
                    f"{REFUSAL_MARK}: site {site} has spent epsilon {_eps(before)} of its budget "
                    f"{budget:g} on these images (all runs, all copies); this round would take "
                    f"them to {_eps(after)}. The hospital decides whether to raise the budget "
                    "(`medfed site --budget-epsilon`)"
                )
            else:
                book.spends[spend_id] = new
        if refusal is not None:
            raise refusal
        return after

    def commit(self, *, run: str, site: str, history: list[Step]) -> float:
        """After training: record the run's real history where it spent more than reserved.

        Returns the epsilon of the dataset's most-spent image.
        """
        spend_id = f"{run}@{site}"
        with self._locked() as book:
            held = book.spends.get(spend_id)
            real = Spend([(float(s), float(q), int(n)) for s, q, n in history],
                         held.datasets if held else [book.add_dataset(self.keys)],
                         held.budget_epsilon if held else None)
            if held is None or (held.history is not None
                                and real.epsilon(book.delta) > held.epsilon(book.delta)):
                book.spends[spend_id] = real
            return book.most_spent(self.keys)

    def record_unbounded(self, *, run: str, site: str) -> None:
        """Before a round without DP: its images' spend becomes unbounded (epsilon inf)."""
        spend_id = f"{run}@{site}"
        with self._locked() as book:
            held = book.spends.get(spend_id)
            datasets = sorted({*(held.datasets if held else []), book.add_dataset(self.keys)})
            book.spends[spend_id] = Spend(None, datasets, None)


def _eps(value: float) -> str:
    if math.isfinite(value):
        return f"{value:.3f}"
    return "unbounded (a run without DP trained on them)"
