"""Folders medfed writes its outputs to: what it owns there, and errors that name the path.

A run folder (and `medfed synth`'s folder) holds a manifest, `.medfed-run.json`, that lists every
top-level file and folder medfed wrote there. `--force` deletes only those; a user's own files
are never removed. A non-empty folder without a manifest is not medfed's, and is refused.

Writing can fail for reasons that are not medfed's (a full disk, a read-only mount, no
permission): `writing(path)` turns such an OSError into an `OutputError` that names the path and
how to fix it.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_open

MANIFEST = ".medfed-run.json"

_FIXES = {
    errno.ENOSPC: "no space left on the device; free space there (or choose another --out)",
    errno.EDQUOT: "disk quota exceeded; free space there (or choose another --out)",
    errno.EROFS: "the file system is read-only; choose a writable --out",
    errno.EACCES: "permission denied; choose a folder you can write to as --out",
    errno.EPERM: "permission denied; choose a folder you can write to as --out",
    errno.EEXIST: "a file is in the way where a folder is needed; give --out a folder path",
    errno.ENOTDIR: "a file is in the way where a folder is needed; give --out a folder path",
}


class OutputError(OSError):
    """A file medfed writes could not be written; the message names it and the fix."""


@contextmanager
def writing(path: Path, *, then: str = "") -> Iterator[None]:
    """Turn an OSError raised while writing `path` into an OutputError naming it and the fix.

    Args:
        then: what to do once fixed (e.g. "continue with --resume RUN_DIR").

    """
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        target = exc.filename or path  # the file the system named, else the one being written
        fix = _FIXES.get(exc.errno or 0)
        if fix is None:
            raise OutputError(exc.errno, f"cannot write {target}: {exc.strerror or exc}") from exc
        raise OutputError(
            exc.errno, f"cannot write {target}: {fix}" + (f"; then {then}" if then else "")
        ) from exc


def _read(folder: Path) -> list[str] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        entries = data["entries"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FileExistsError(
            f"{path} is unreadable ({type(exc).__name__}: {exc}); medfed cannot tell its own "
            f"files in {folder} from yours: move what you want to keep, delete the folder, "
            "and run again"
        ) from None
    return [str(e) for e in entries if _safe(str(e))]


def _safe(name: str) -> bool:
    # only plain names directly inside the folder: a manifest never reaches outside it
    return bool(name) and name not in (".", "..", MANIFEST) and "/" not in name and "\\" not in name


def _write(folder: Path, entries: Iterable[str]) -> None:
    path = folder / MANIFEST
    with writing(path), atomic_open(path) as fh:  # its temporary name starts with MANIFEST
        json.dump({"written-by": "medfed", "entries": sorted(set(entries))}, fh, indent=1)


def note(folder: Path, *paths: Path | str) -> None:
    """Add files or folders medfed wrote directly inside `folder` to its manifest."""
    names = [Path(p).name for p in paths]
    known = _read(folder) or []
    new = [n for n in names if _safe(n) and n not in known]
    if new or not (folder / MANIFEST).is_file():
        _write(folder, [*known, *new])


def owned(folder: Path) -> list[str]:
    """The entries of `folder` that medfed wrote (none when it has no manifest)."""
    return _read(folder) or []


def prepare(
    folder: Path, *, force: bool, writes: Iterable[str], flag: str = "--out",
    exists_hint: str = "choose another folder, or pass --force to replace it",
    legacy: Callable[[Path], bool] | None = None,
) -> None:
    """Make `folder` ready for a new set of medfed outputs, or refuse (FileExistsError).

    - missing or empty: created, with an empty manifest;
    - a medfed folder (manifest): refused unless `force`; with `force` every entry medfed wrote
      is deleted, the user's own files stay. When one of `writes` (what medfed is about to
      write) is there and not medfed's, nothing is deleted and the user is told to move it;
    - anything else (a file, a non-empty folder without a manifest): refused, force or not.

    Args:
        writes: top-level names the command is about to write.
        exists_hint: how to go on when the folder already holds medfed's outputs.
        legacy: recognises a folder medfed wrote before it kept manifests; there, only the
            entries of `writes` count as medfed's.

    """
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(
            f"{flag} {folder} is a file, not a folder; give a folder path (it is created when "
            "missing)"
        )
    # the manifest alone (a run that stopped before writing anything) is an empty folder
    present = sorted(
        p.name for p in (folder.iterdir() if folder.is_dir() else ())
        if not p.name.startswith(MANIFEST)
    )
    if not present:
        with writing(folder):
            folder.mkdir(parents=True, exist_ok=True)
        _write(folder, [])
        return
    writes = list(writes)
    ours = _read(folder)
    if ours is None and legacy is not None and legacy(folder):
        ours = [n for n in writes if n in present]
    if ours is None:
        raise FileExistsError(
            f"{flag} {folder} is not empty and is not a medfed output folder (no {MANIFEST}); "
            "choose a new or empty folder. --force replaces only what medfed wrote, so it "
            "cannot be used here"
        )
    if not force:
        raise FileExistsError(f"{flag} {folder} already holds medfed outputs; {exists_hint}")
    theirs = [n for n in writes if n in present and n not in ours]
    if theirs:
        raise FileExistsError(
            f"{flag} {folder}: {', '.join(theirs)} {'is' if len(theirs) == 1 else 'are'} not "
            f"medfed's (not in {MANIFEST}) and would be overwritten; move "
            f"{'it' if len(theirs) == 1 else 'them'} away, or choose another folder. "
            "Nothing was deleted"
        )
    remove(folder, ours)
    _write(folder, [])


def remove(folder: Path, names: Iterable[str]) -> None:
    """Delete these top-level entries of `folder` (files, links, whole folders) where present."""
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def json_clean(value: Any) -> Any:
    """NaN and infinities become null: results.json stays strict JSON any tool can read."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_clean(v) for v in value]
    if isinstance(value, np.generic):
        return json_clean(value.item())
    return value


def write_json(path: Path, data: Any, *, then: str = "") -> None:
    """Write JSON atomically (a reader never sees half a file).

    Raises OutputError naming `path` and the fix when the disk is full or not writable.
    """
    with writing(path, then=then):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as fh:
            json.dump(json_clean(data), fh, indent=2, allow_nan=False)
