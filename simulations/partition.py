"""Split one pool of labelled images into N virtual hospital sites, reproducibly from a seed.

Three ways, as in the federated-learning literature (e.g. Hsu et al. 2019 for Dirichlet label skew):

- `iid`: a random permutation cut into N near-equal parts (sizes differ by at most one).
- `dirichlet`: label skew. For each class c, site shares p_c ~ Dirichlet(alpha * 1_N); a small
  alpha (0.1) gives sites dominated by one class, a large alpha (100) comes close to IID.
- `quantity`: size skew. Site shares q ~ Dirichlet(alpha * 1_N) of a random permutation; labels
  stay IID within a site, sizes vary (small alpha: a few large sites and many tiny ones).

Every sample goes to exactly one site (sizes sum to the pool). When the pool has at least N
samples, no site is left empty: an empty site takes one sample from the largest site.

Virtual sites (`VirtualSites`) are what `medfed simulate` hands to Flower: a lazy sequence of
`SiteRef`s named `site-0001` ... that all point at the pool folder. A worker process decodes the
pool once (`pooled`, cached) and answers each site's request by indexing into it, so memory does
not grow with the number of sites, and nothing but the recipe is shipped to the workers.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, overload

import numpy as np

from common.data import Preprocess, SiteData
from common.sites import SiteRef

PARTITIONS = ("iid", "dirichlet", "quantity")
# splits of the pool that are shared out; the pool's test split stays central (the global test set)
SHARED_SPLITS = ("train", "val")
_NAME_PREFIX = "site-"


def site_name(index: int) -> str:
    """Name of the virtual site at `index` (0-based): site-0001, site-0002, ..."""
    return f"{_NAME_PREFIX}{index + 1:04d}"


def site_index(name: str) -> int:
    """Inverse of `site_name`."""
    if not name.startswith(_NAME_PREFIX) or not name[len(_NAME_PREFIX):].isdigit():
        raise ValueError(f"{name!r} is not a virtual site name (site-0001, site-0002, ...)")
    return int(name[len(_NAME_PREFIX):]) - 1


@dataclass(frozen=True)
class PartitionSpec:
    """How a pool is shared among `num_sites` sites (`method` one of PARTITIONS)."""

    num_sites: int
    method: str = "iid"
    alpha: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_sites < 1:
            raise ValueError(f"sites must be >= 1, got {self.num_sites}")
        if self.method not in PARTITIONS:
            raise ValueError(
                f"data.partition must be one of {', '.join(PARTITIONS)}, got {self.method!r}"
            )
        if not self.alpha > 0:
            raise ValueError(f"data.alpha must be > 0 (e.g. 0.5), got {self.alpha}")


def _split_counts(total: int, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Counts summing to `total`, proportional to `shares` (largest remainder, random ties)."""
    raw = shares / shares.sum() * total
    counts = np.floor(raw).astype(np.int64)
    left = total - int(counts.sum())
    if left:
        # random tie-break so that equal shares do not always favour the first sites
        order = np.lexsort((rng.random(len(raw)), -(raw - counts)))
        counts[order[:left]] += 1
    return counts


def _fill_empty(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Give every empty site one sample from the currently largest site (total unchanged)."""
    total = sum(len(p) for p in parts)
    if total < len(parts):
        return parts
    parts = list(parts)
    sizes = np.array([len(p) for p in parts])
    for empty in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))
        parts[int(empty)], parts[donor] = parts[donor][-1:], parts[donor][:-1]
        sizes[empty], sizes[donor] = 1, sizes[donor] - 1
    return parts


class Shares(NamedTuple):
    """What a partition draws once and applies to every split: per-class or per-site shares."""

    by_class: np.ndarray | None  # (num_classes, num_sites), dirichlet
    by_site: np.ndarray | None  # (num_sites,), quantity


def draw_shares(spec: PartitionSpec, num_classes: int) -> Shares:
    """The random shares of `spec` (same seed, same shares)."""
    rng = np.random.default_rng([spec.seed, 0x5EED])
    ones = np.full(spec.num_sites, spec.alpha)
    if spec.method == "dirichlet":
        return Shares(rng.dirichlet(ones, size=num_classes), None)
    if spec.method == "quantity":
        return Shares(None, rng.dirichlet(ones))
    return Shares(None, None)


def partition(
    labels: np.ndarray, spec: PartitionSpec, *, shares: Shares | None = None, salt: int = 0
) -> list[np.ndarray]:
    """Indices into `labels` of each site's samples (a list of `spec.num_sites` sorted arrays).

    Args:
        shares: draws of `draw_shares` to reuse, so that a pool's train and validation splits
            get the same label or size skew; drawn from `spec` when None.
        salt: varies the shuffling (one value per split) without changing the shares.

    """
    labels = np.asarray(labels)
    n, num_sites = len(labels), spec.num_sites
    num_classes = int(labels.max()) + 1 if n else 1
    if shares is None:
        shares = draw_shares(spec, num_classes)
    rng = np.random.default_rng([spec.seed, 0xD15, salt])
    if spec.method == "dirichlet":
        assert shares.by_class is not None  # internal: draw_shares returns them for dirichlet
        if len(shares.by_class) < num_classes:
            raise ValueError(f"shares drawn for {len(shares.by_class)} classes, labels have more")
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for c in range(num_classes):
            members = rng.permutation(np.flatnonzero(labels == c))
            counts = _split_counts(len(members), shares.by_class[c], rng)
            for site, chunk in enumerate(np.split(members, np.cumsum(counts)[:-1])):
                pieces[site].append(chunk)
        parts = [np.concatenate(p) if p else np.zeros(0, np.int64) for p in pieces]
    else:
        order = rng.permutation(n)
        site_shares = shares.by_site if spec.method == "quantity" else None
        counts = _split_counts(
            n, site_shares if site_shares is not None else np.ones(num_sites), rng
        )
        parts = np.split(order, np.cumsum(counts)[:-1])
    return [np.sort(p).astype(np.int64) for p in _fill_empty(parts)]


def label_skew(labels: np.ndarray, parts: Sequence[np.ndarray]) -> float:
    """Mean total-variation distance between each site's label distribution and the pool's.

    0 for sites that all look like the pool; close to 1 when every site holds a single class of
    a many-class pool. Empty sites are left out.
    """
    labels = np.asarray(labels)
    classes = int(labels.max()) + 1
    pooled = np.bincount(labels, minlength=classes) / len(labels)
    distances = [
        0.5 * np.abs(np.bincount(labels[p], minlength=classes) / len(p) - pooled).sum()
        for p in parts
        if len(p)
    ]
    return float(np.mean(distances))


class PooledSplit(NamedTuple):
    """One split of the pool (labelled samples only) and each site's indices into it."""

    images: np.ndarray
    labels: np.ndarray
    parts: list[np.ndarray]


@functools.lru_cache(maxsize=2)
def pooled(
    pool: Path, pre: Preprocess, data_seed: int, spec: PartitionSpec
) -> dict[str, PooledSplit]:
    """The pool's train and val splits, decoded once per process, and every site's share of each.

    Cached per worker process: a Ray worker serving hundreds of virtual sites holds one copy.
    """
    data = SiteData(pool, pre, seed=data_seed)
    arrays = {}
    for split in SHARED_SPLITS:
        s = data.split(split)
        keep = s.labels >= 0
        arrays[split] = (s.images[keep], s.labels[keep])
    num_classes = max((int(lab.max()) + 1 for _, lab in arrays.values() if len(lab)), default=1)
    shares = draw_shares(spec, num_classes)
    return {
        split: PooledSplit(images, labels, partition(labels, spec, shares=shares, salt=i))
        for i, (split, (images, labels)) in enumerate(arrays.items())
    }


@dataclass(frozen=True)
class VirtualSites(Sequence[SiteRef]):
    """`spec.num_sites` virtual sites cut out of the one folder `pool`, made on demand.

    A sequence of SiteRefs (what Flower's partition-id indexes) whose data comes from `labelled`.
    Only this recipe travels to the simulation's workers, never a per-site list.
    """

    pool: Path
    state_root: Path
    spec: PartitionSpec

    def __len__(self) -> int:
        return self.spec.num_sites

    @overload
    def __getitem__(self, index: int) -> SiteRef: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[SiteRef]: ...

    def __getitem__(self, index: int | slice) -> SiteRef | Sequence[SiteRef]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"virtual site {index} of {len(self)}")
        name = site_name(index % len(self))
        # each virtual site's images are its own dataset, with its own privacy ledger
        return SiteRef(name, self.pool, self.state_root / name, subset=name)

    def __iter__(self) -> Iterator[SiteRef]:
        return (self[i] for i in range(len(self)))

    def names(self) -> list[str]:
        """Every site's name, in partition-id order."""
        return [site_name(i) for i in range(len(self))]

    def labelled(
        self, site: SiteRef, pre: Preprocess, seed: int, split: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """The labelled samples of `split` ("train" or "val") that site `site` holds.

        None of `test`: the pool's test split is the central test set, so a virtual site asked
        for its own (the run's cross-site evaluation, server.cross_site) has no rows there and
        scores its validation split instead.
        """
        if split == "test":
            empty = pooled(self.pool, pre, seed, self.spec)["val"]
            return empty.images[:0], empty.labels[:0]
        if split not in SHARED_SPLITS:
            raise ValueError(
                f"virtual sites hold {' and '.join(SHARED_SPLITS)} only, not {split!r}"
            )
        part = pooled(self.pool, pre, seed, self.spec)[split]
        index = part.parts[site_index(site.name)]
        return part.images[index], part.labels[index]

    def sizes(self, pre: Preprocess, seed: int, split: str = "train") -> list[int]:
        """Samples per site in `split` (decodes the pool in this process)."""
        return [len(p) for p in pooled(self.pool, pre, seed, self.spec)[split].parts]
