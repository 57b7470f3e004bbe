"""Errors and skip records shared by the image-ingestion layer.

Two levels of failure, because a hospital site must keep training when one file is bad:
`DataError` means the whole site is unusable as given (labels.csv missing or malformed),
`ImageError` means one image is unusable; the site layer turns it into a `Problem` and goes on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class DataError(Exception):
    """Site-level input that cannot be used; the message names the file and says how to fix it."""


class ImageError(ValueError):
    """One image (file, series folder or mask) that cannot be read; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Long exception messages (pydicom quotes raw bytes) would bury the data card; keep the start.
_MAX_MESSAGE = 300


def is_file_failure(error: BaseException) -> bool:
    """True for what reading one damaged file can raise; False for interrupts and exits.

    A Rust codec (pylibjpeg-rle is built with pyo3) that panics on a damaged stream raises
    `pyo3_runtime.PanicException`, which derives from BaseException so that `except Exception`
    does not stop it; each pyo3 module has its own copy of the class, so it is known by name.
    The fuzz test found one (an RLE segment offset past the frame). KeyboardInterrupt and
    SystemExit must still end the program.
    """
    return isinstance(error, Exception) or type(error).__name__ == "PanicException"


def as_image_error(error: BaseException) -> ImageError:
    """Turn any exception raised while reading one file into that file's ImageError.

    A hospital archive holds files no reader has seen; whatever a parser or codec raises on one
    of them (TypeError on an invalid header value, MemoryError, ...) must cost that file only.
    The reason keeps the exception's class and message, so the file can be reported upstream.
    """
    if isinstance(error, ImageError):
        return error
    if isinstance(error, MemoryError):
        return ImageError(
            f"out of memory while decoding ({described(error)}); "
            "decode it on a machine with more memory or export a smaller image"
        )
    return ImageError(
        f"unexpected error while reading ({described(error)}); "
        "the file is damaged or unusual: export it again"
    )


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def described(error: BaseException) -> str:
    """Return "Class: message" on one line, cut to a length a data card can show."""
    message = " ".join(str(error).split()) or "no message"
    # an object's repr names its memory address (pillow's "<_io.BytesIO object at 0x7f...>"),
    # which differs between reads of the same file: the reason must not
    message = _ADDRESS.sub("", message)
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + "..."
    return f"{type(error).__name__}: {message}"


@dataclass(frozen=True)
class Problem:
    """A file that was skipped, with the reason, e.g. ``Problem("scan_017.dcm", "... skipped")``.

    `path` is relative to the site folder, so the report can be shared without leaking the
    hospital's directory layout.
    """

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"
