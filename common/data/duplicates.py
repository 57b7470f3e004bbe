"""The same image listed more than once in a site, found by what it holds, not by its name.

A copy of a training image in the test split (a byte-identical file, a symlink to it, or a
re-export that kept the DICOM SOP Instance UID) lets the model be tested on what it learned:
every local metric is inflated. labels.csv already refuses the same path twice; this finds the
rest.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom

from common.data.labels import Row
from common.data.nifti import is_nifti


@dataclass(frozen=True)
class Duplicate:
    """Rows of labels.csv that hold the same image; `match` says how they were found to."""

    paths: tuple[str, ...]
    splits: tuple[str, ...]
    labels: tuple[int | None, ...]
    match: str

    @property
    def across_splits(self) -> bool:
        """True when the copies sit in different splits (a leak between train, val and test)."""
        return len(set(self.splits)) > 1


@dataclass(frozen=True)
class _Identity:
    real: str  # the resolved path: two names of one file (a symlink) share it
    digest: str  # sha256 of the bytes (a folder: of its files' digests, names left out)
    uids: frozenset[str]  # DICOM SOP Instance UIDs


def find_duplicates(site_dir: Path, rows: Iterable[Row]) -> list[Duplicate]:
    """Group `rows` whose images are one file, byte-identical, or share a SOP Instance UID.

    Files that cannot be read are left out (the data card reports them already).
    """
    rows = list(rows)
    identities: list[_Identity | None] = [_identity(site_dir / row.path) for row in rows]
    parent = list(range(len(rows)))
    how: dict[int, set[str]] = {}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for kind, keys in (
        ("the same file (a symlink or a repeated path)", lambda ident: [ident.real]),
        ("byte-identical copies", lambda ident: [ident.digest]),
        ("the same DICOM SOP Instance UID", lambda ident: sorted(ident.uids)),
    ):
        first: dict[str, int] = {}
        for index, ident in enumerate(identities):
            if ident is None:
                continue
            for key in keys(ident):
                if key not in first:
                    first[key] = index
                    continue
                a, b = root(first[key]), root(index)
                if a != b:
                    parent[b] = a
                    how.setdefault(a, set()).update(how.pop(b, set()))
                    how[a].add(kind)

    groups: dict[int, list[int]] = {}
    for index in range(len(rows)):
        groups.setdefault(root(index), []).append(index)
    found = []
    for top, members in groups.items():
        if len(members) < 2:
            continue
        # The most telling description first: one file beats equal bytes beats equal UIDs.
        kinds = how.get(top, set())
        match = next(k for k in (
            "the same file (a symlink or a repeated path)", "byte-identical copies",
            "the same DICOM SOP Instance UID",
        ) if k in kinds)
        found.append(Duplicate(
            paths=tuple(rows[i].path for i in members),
            splits=tuple(rows[i].split for i in members),
            labels=tuple(rows[i].label for i in members),
            match=match,
        ))
    return found


def _identity(path: Path) -> _Identity | None:
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            parts = [_file_identity(f) for f in files]
            digest = hashlib.sha256("".join(sorted(d for d, _ in parts)).encode()).hexdigest()
            return _Identity(str(path.resolve()), digest, frozenset(u for _, u in parts if u))
        digest, uid = _file_identity(path)
        return _Identity(str(path.resolve()), digest, frozenset({uid} if uid else ()))
    except OSError:
        return None


def _file_identity(path: Path) -> tuple[str, str | None]:
    """(sha256 of the bytes, SOP Instance UID or None), reading the file once."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if is_nifti(path):
        return digest, None
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data), stop_before_pixels=True, force=True,
            specific_tags=["SOPInstanceUID"],
        )
        uid = str(ds.get("SOPInstanceUID", "")).strip()
    # Whatever the header holds, a file that does not parse simply has no UID to compare.
    except Exception:
        uid = ""
    return digest, uid or None
