"""Atomic file writes: a reader, or a restart after a power cut, finds the old file or the new.

The content goes to a temporary file beside the target, is flushed and fsync'ed, and is renamed
onto the target with `os.replace`; then the folder is fsync'ed, so the rename itself is on disk.
Without the fsyncs a crash soon after a write can leave the new name pointing at an empty or torn
file (file systems may commit the rename before the data): for a privacy ledger that is spent
budget forgotten, for a site's audit key a site that can no longer sign.

The temporary file is in the same folder (a rename cannot cross file systems, nor be atomic there),
has a hidden name (folder scans skip dot-names) and a random part (two processes writing the same
target never share one). On any failure it is removed and the target is left as it was.

Every module writes files this way through here; `tests/common/test_atomic.py` fails when a
module grows a rename of its own.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

PRIVATE = 0o600  # what tempfile.mkstemp gives, and so what these files had before this module
# as open() creates a file: 0o666 less the process umask (a user's report, a served page)
UMASK = None

_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
# fsync of a folder is not supported everywhere (some network and FUSE file systems); the file
# itself was fsync'ed, so there the rename is only as durable as that file system makes it
_NO_FOLDER_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR}


@contextmanager
def atomic_open(
    path: Path | str, mode: str = "w", *, permissions: int | None = PRIVATE,
    encoding: str = "utf-8", exclusive: bool = False, durable: bool = True,
) -> Iterator[IO[Any]]:
    """A file object whose content replaces `path` when the block ends without an exception.

    Args:
        mode: "w" (text) or "wb" (bytes).
        permissions: the file's mode bits, set exactly (the umask does not narrow them), or
            UMASK for what `open()` would create.
        encoding: for text mode.
        exclusive: publish only if `path` does not exist yet (FileExistsError otherwise, the
            existing file untouched): for a file made once and never replaced, such as a key.
        durable: False skips both fsyncs, still atomic for readers: only for a cache whose
            torn entry after a power cut is a miss (an fsync costs ~10 ms, a cache write ~0.5).

    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    fd, tmp = _temporary(target, permissions)
    try:
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, target)  # fails, atomically, when another process made it meanwhile
            tmp.unlink()
        else:
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_folder(target.parent)


def write_bytes(
    path: Path | str, data: bytes, *, permissions: int | None = PRIVATE, exclusive: bool = False
) -> None:
    """Replace `path` with `data` atomically and durably (see `atomic_open`)."""
    with atomic_open(path, "wb", permissions=permissions, exclusive=exclusive) as fh:
        fh.write(data)


def write_text(
    path: Path | str, text: str, *, permissions: int | None = PRIVATE, encoding: str = "utf-8"
) -> None:
    """Replace `path` with `text` atomically and durably (see `atomic_open`)."""
    with atomic_open(path, "w", permissions=permissions, encoding=encoding) as fh:
        fh.write(text)


def _temporary(target: Path, permissions: int | None) -> tuple[int, Path]:
    """A new, empty, hidden file beside `target`: its descriptor and path."""
    stem = target.name if target.name.startswith(".") else f".{target.name}"
    for _ in range(100):  # 48 random bits: a clash is already one in billions
        tmp = target.with_name(f"{stem}-{secrets.token_hex(6)}.tmp")
        try:
            # created private; widened below by fchmod, which the umask does not narrow
            fd = os.open(tmp, _OPEN_FLAGS, 0o666 if permissions is None else 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            # name the file being written, not the temporary one nobody asked for
            raise OSError(exc.errno, exc.strerror, str(target)) from exc
        if permissions is not None and permissions != 0o600:
            try:
                os.fchmod(fd, permissions)
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
        return fd, tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name beside it", str(target))


def _fsync_folder(folder: Path) -> None:
    """Put the folder's entries (the rename just made) on disk, where the system can."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a folder one may write but not list, or a system (Windows) that cannot open one
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_FOLDER_FSYNC:
            raise
    finally:
        os.close(fd)
