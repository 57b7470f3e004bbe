"""A hospital site's images as arrays per split, skipping (and reporting) unusable files."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from common.data.cache import ImageCache
from common.data.errors import DataError, ImageError, Problem, as_image_error, is_file_failure
from common.data.image import LoadedImage
from common.data.labels import SPLITS, Row, read_labels
from common.data.limits import max_image_bytes
from common.data.preprocess import Preprocess

log = logging.getLogger(__name__)

SPLIT_CHOICES = (*SPLITS, "all")
UNLABELLED = -1


@dataclass
class SiteArrays:
    """Samples of one split: every slice of every readable image is one sample.

    images: float32 (N, C, H, W) in [0, 1].
    labels: int64 (N,), -1 for unlabelled.
    rows: int64 (N,), index into SiteData.rows of the row each sample came from.
    masks: uint8 (N, 1, H, W) when every sample's row has a mask, else None.
    """

    images: np.ndarray
    labels: np.ndarray
    rows: np.ndarray
    masks: np.ndarray | None = None


class LoadedRow(NamedTuple):
    """One readable row of labels.csv with its decoded image and, if listed, mask."""

    row_index: int
    image: LoadedImage
    mask: np.ndarray | None
    placement: str | None = None  # how the mask was put on the image (common.data.alignment)


_LOGGED_PROBLEMS = 5
# A split's arrays are kept in memory for the next call up to this size: a simulation worker asks
# for the same site's split every round, and re-reading it from the disk cache costs more than a
# small site's training round. Larger splits are re-read, so memory stays bounded by the caller.
MEMO_BYTES = 256 * 2**20


class SiteData:
    """The images of one site folder, decoded lazily through the disk cache.

    Reads labels.csv at construction (DataError if unusable). Files that cannot be read are
    skipped, logged as warnings and collected in `problems`.
    """

    def __init__(
        self,
        site_dir: Path,
        pre: Preprocess,
        *,
        seed: int = 0,
        cache_dir: Path | None = None,
        masks: bool = False,
    ) -> None:
        self.site_dir = Path(site_dir)
        # Only tasks that train on masks load them; a broken mask must not cost a classifier
        # the image.
        self.load_masks = masks
        self.name = self.site_dir.resolve().name
        self.pre = pre
        self.rows: list[Row] = read_labels(self.site_dir, seed=seed)
        try:
            max_image_bytes()  # a bad $MEDFED_MAX_IMAGE_MB is the site's problem, not each file's
        except ValueError as e:
            raise DataError(str(e)) from None
        self.problems: list[Problem] = []
        self._cache = ImageCache(cache_dir)
        # Rows already found unreadable are not retried by later split() calls.
        self._failed: set[int] = set()
        self._reported: set[Problem] = set()
        self._splits: dict[str, SiteArrays] = {}

    def counts(self) -> dict[str, dict[int, int]]:
        """Labelled rows per class for each of train/val/test, from labels.csv (no decoding).

        Unlabelled rows are not counted here (the data card reports them separately).
        """
        result: dict[str, dict[int, int]] = {}
        for split in SPLITS:
            labels = Counter(r.label for r in self.rows if r.split == split and r.label is not None)
            result[split] = dict(sorted(labels.items()))
        return result

    def split(self, which: str) -> SiteArrays:
        """Return the samples of "train", "val", "test" or "all" (decoding only cache misses).

        The same call again returns the same arrays (up to `MEMO_BYTES`): callers must not
        modify them in place.
        """
        if which in self._splits:
            return self._splits[which]
        arrays = self._read_split(which)
        size = arrays.images.nbytes + (arrays.masks.nbytes if arrays.masks is not None else 0)
        if size <= MEMO_BYTES:
            self._splits[which] = arrays
        return arrays

    def _read_split(self, which: str) -> SiteArrays:
        images: list[np.ndarray] = []
        labels: list[int] = []
        rows: list[int] = []
        masks: list[np.ndarray | None] = []
        for loaded in self.iter_rows(which):
            count = len(loaded.image.pixels)
            label = self.rows[loaded.row_index].label
            images.append(loaded.image.pixels)
            labels += [UNLABELLED if label is None else label] * count
            rows += [loaded.row_index] * count
            masks.append(loaded.mask)
        size, channels = self.pre.image_size, self.pre.channels
        with_masks = bool(masks) and all(m is not None for m in masks)
        return SiteArrays(
            images=(
                np.concatenate(images)
                if images
                else np.zeros((0, channels, size, size), dtype=np.float32)
            ),
            labels=np.asarray(labels, dtype=np.int64),
            rows=np.asarray(rows, dtype=np.int64),
            masks=np.concatenate([m for m in masks if m is not None]) if with_masks else None,
        )

    def iter_rows(self, which: str) -> Iterator[LoadedRow]:
        """Yield each readable row of split `which` with its decoded image (and mask)."""
        if which not in SPLIT_CHOICES:
            raise ValueError(f"split must be one of {', '.join(SPLIT_CHOICES)}; got {which!r}")
        for index, row in enumerate(self.rows):
            if (which != "all" and row.split != which) or index in self._failed:
                continue
            loaded = self._load(index, row)
            if loaded is None:
                self._failed.add(index)
            else:
                yield loaded

    def _load(self, index: int, row: Row) -> LoadedRow | None:
        # The per-file boundary: any exception while reading one file (not only ImageError:
        # a parser's TypeError, a MemoryError) skips that row, named, and the site goes on.
        try:
            image = self._cache.image(self.site_dir / row.path, self.pre)
        except BaseException as e:
            if not is_file_failure(e):
                raise
            self._skip(row.path, e, "skipped")
            return None
        for inner in image.meta.skipped:
            self._report(Problem(f"{row.path}/{inner.path}", inner.reason))
        mask, placement = None, None
        if row.mask is not None and self.load_masks:
            try:
                mask, _, placement = self._cache.mask(
                    self.site_dir / row.mask, self.pre, like=image.meta,
                    image=self.site_dir / row.path,
                )
            except BaseException as e:
                if not is_file_failure(e):
                    raise
                # An image whose declared mask is broken would train a segmenter on nothing.
                self._skip(row.mask, e, f"row {row.path} skipped")
                return None
        return LoadedRow(index, image, mask, placement)

    def _skip(self, path: str, error: BaseException, outcome: str) -> None:
        reason = as_image_error(error).reason
        # A library message may quote the full path; the card names files relative to the site.
        for folder in {self.site_dir.resolve(), self.site_dir.absolute(), self.site_dir}:
            reason = reason.replace(f"{folder}/", "")
        if not isinstance(error, ImageError):  # unexpected: keep the trace for a bug report
            log.debug("site %s: %s failed", self.name, path, exc_info=error)
        self._report(Problem(path, f"{reason}; {outcome}"))

    def _report(self, problem: Problem) -> None:
        if problem in self._reported:
            return
        self._reported.add(problem)
        self.problems.append(problem)
        # A broken export can make hundreds of files fail alike: log a few, point to the card.
        if len(self.problems) <= _LOGGED_PROBLEMS:
            log.warning("site %s: %s: %s", self.name, problem.path, problem.reason)
        elif len(self.problems) == _LOGGED_PROBLEMS + 1:
            log.warning(
                "site %s: more files skipped; `medfed check-data %s` lists every one",
                self.name, self.site_dir,
            )
