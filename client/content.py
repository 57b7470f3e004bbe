"""What a site trains on, named by content: the keys the privacy ledger charges.

The ledger charges images, not folders: a hard link, a copy or a renamed folder holds the same
bytes, so it gets the same keys and shares the spend. Each file's key is its SHA-256 (the first
128 bits, in hex); a row of labels.csv that names a folder (a DICOM series) stands for every
file under it. Hashing is cached per file by (device, inode, size, mtime_ns), in memory and in
`content-hashes.json` beside the ledger, so a round does not re-read the images.

What this does not cover: a copy whose bytes differ (a re-encoded or re-anonymised export) is a
different dataset to the ledger; the hospital that makes one decides about its budget.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from common.atomic import atomic_open
from common.data.labels import read_labels

log = logging.getLogger(__name__)

CACHE_FILE = "content-hashes.json"
_CHUNK = 1 << 20
_memory: dict[str, str] = {}


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:32]


def site_files(data_dir: Path, *, split: str | None, seed: int = 0) -> list[Path]:
    """The files behind labels.csv's rows of `split` (every row when None) that exist."""
    files: list[Path] = []
    for row in read_labels(data_dir, seed=seed):
        if split is not None and row.split != split:
            continue
        path = data_dir / row.path
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
    return files


class ContentHashes:
    """SHA-256 keys of files, hashed once per (device, inode, size, mtime_ns)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / CACHE_FILE

    def _load(self) -> dict[str, str]:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # only a cache: a lost or damaged one costs a re-hash, never a spend
        return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    def keys(self, files: Iterable[Path]) -> list[str]:
        """One key per file, in order.

        A file that is gone is left out: the site's loader cannot train on it either. One that
        exists but cannot be read is keyed by its identity on this disk (the decoded-image
        cache may still serve it), so it is charged all the same.
        """
        stored: dict[str, str] | None = None
        found: dict[str, str] = {}
        keys: list[str] = []
        for path in files:
            try:
                stat = _stat_key(path)
            except OSError:
                continue
            key = _memory.get(stat) or found.get(stat)
            if key is None:
                if stored is None:
                    stored = self._load()
                key = stored.get(stat)
            if key is None:
                try:
                    key = _sha256(path)
                except OSError as exc:
                    log.warning("%s: cannot be read to hash it for the privacy ledger (%s); "
                                "charged by its place on this disk", path, exc)
                    keys.append(f"file-{stat}")
                    continue
                found[stat] = key
            _memory[stat] = key
            keys.append(key)
        if found:
            self._save({**(stored if stored is not None else self._load()), **found})
        return keys

    def _save(self, values: dict[str, str]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(self.path) as fh:
                json.dump(values, fh)
        except OSError as exc:
            log.warning("could not keep the content-hash cache %s (%s); images will be "
                        "hashed again next round", self.path, exc)


def dataset_keys(
    data_dir: Path, hashes: ContentHashes, *, split: str | None, seed: int = 0, subset: str = ""
) -> list[str]:
    """The ledger's keys for a site's images of `split` (sorted, unique).

    A virtual site (`subset`, a simulation's part of one pooled folder) is one key: the pool's
    content and the part's name. Its images all share one history, so one key says the same
    with one entry instead of one per pooled image and virtual site.
    """
    keys = sorted(set(hashes.keys(site_files(data_dir, split=split, seed=seed))))
    if not subset:
        return keys
    pool = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32]
    return [f"pool-{pool}#{subset}"]
