"""Disk cache of decoded images, so epochs and federated rounds never re-decode DICOM.

One file per (absolute path, size, mtime, Preprocess, loader VERSION), named by a sha256 key.
Writes are atomic (common.atomic: temporary file, then rename) because several client
processes may share one cache; an unreadable entry is simply decoded again. Nothing is ever
written into the site folder, which hospitals often mount read-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_open
from common.data.image import LoadedImage, decode_mask, load_image
from common.data.preprocess import Preprocess
from common.data.volume import ImageMeta

log = logging.getLogger(__name__)

# Bump when decoding or normalisation changes, so stale entries are never served.
# 2: non-finite images, non-image SOP classes and oversized files refused; Modality inferred.
# 3: masks placed on their image by geometry and content (keyed by the image too).
# 4: label maps resampled by the most-covering class (common.data.normalize), not nearest.
VERSION = 4
CACHE_ENV = "MEDFED_CACHE_DIR"


def default_cache_dir() -> Path:
    """Return $MEDFED_CACHE_DIR, else ~/.cache/medfed."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "medfed"


class ImageCache:
    """Decoded images and masks on disk; `image` and `mask` decode only on a miss."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self._warned = False

    def image(self, path: Path, pre: Preprocess) -> LoadedImage:
        """Return load_image(path, pre), from the cache when possible."""
        key = self._key("image", path, pre)
        hit = self._read(key)
        if hit is not None:
            return LoadedImage(hit[0].astype(np.float32), hit[1])
        loaded = load_image(path, pre)
        # float16 halves the cache; returning the rounded values on a miss too keeps a
        # training run bit-identical whether or not the cache was warm.
        stored = loaded.pixels.astype(np.float16)
        self._write(key, stored, loaded.meta)
        return LoadedImage(stored.astype(np.float32), loaded.meta)

    def mask(
        self, path: Path, pre: Preprocess, *, like: ImageMeta, image: Path
    ) -> tuple[np.ndarray, ImageMeta, str]:
        """Return decode_mask(path, pre, like=like, image=image), from the cache when possible.

        Keyed by the image too: the same mask file is placed on each image it is listed with.
        """
        key = self._key("mask", path, pre, image)
        hit = self._read(key)
        if hit is not None and hit[2]:
            return hit[0].astype(np.uint8), hit[1], hit[2]
        mask, meta, placement = decode_mask(path, pre, like=like, image=image)
        self._write(key, mask, meta, placement)
        return mask, meta, placement

    def _key(self, kind: str, path: Path, pre: Preprocess, image: Path | None = None) -> str | None:
        try:
            identity = _fingerprint(Path(path))
            if image is not None:
                identity.append(_fingerprint(Path(image)))
        except OSError:
            return None  # missing or unreadable: let the loader report it precisely
        text = json.dumps([VERSION, kind, identity, pre.to_dict()], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def _file(self, key: str) -> Path:
        return self.root / f"v{VERSION}" / key[:2] / f"{key}.npz"

    def _read(self, key: str | None) -> tuple[np.ndarray, ImageMeta, str] | None:
        if key is None:
            return None
        file = self._file(key)
        if not file.is_file():
            return None
        try:
            with np.load(file, allow_pickle=False) as stored:
                note = str(stored["note"]) if "note" in stored else ""
                return (stored["pixels"], ImageMeta.from_dict(json.loads(str(stored["meta"]))),
                        note)
        # A torn, truncated or foreign file is only a miss: decoding again is always safe.
        except Exception as e:
            log.debug("cache entry %s unreadable (%s); decoding again", file, e)
            return None

    def _write(
        self, key: str | None, pixels: np.ndarray, meta: ImageMeta, note: str = ""
    ) -> None:
        if key is None:
            return
        file = self._file(key)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            # not durable: a torn entry after a power cut is a miss, and an fsync per image
            # would cost more than writing it
            with atomic_open(file, "wb", durable=False) as f:
                np.savez(f, pixels=pixels, meta=np.array(json.dumps(meta.to_dict())),
                         note=np.array(note))
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning(
                    "cannot write the image cache in %s (%s); images will be decoded every "
                    "time; set %s to a writable folder",
                    self.root,
                    e,
                    CACHE_ENV,
                )


def _fingerprint(path: Path) -> list[Any]:
    """Identify a file or series folder by absolute path, sizes and modification times."""
    stat = path.stat()
    identity: list[Any] = [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    if path.is_dir():
        # A folder's own mtime misses a slice rewritten in place; list every file.
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if entry.is_file():
                info = entry.stat()
                identity.append([entry.name, info.st_size, info.st_mtime_ns])
    return identity
