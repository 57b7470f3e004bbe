"""Errors and skip records shared by the image-ingestion layer.

Two levels of failure, because a hospital site must keep training when one file is bad:
`DataError` means the whole site is unusable as given (labels.csv missing or malformed),
`ImageError` means one image is unusable; the site layer turns it into a `Problem` and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass


class DataError(Exception):
    """Site-level input that cannot be used; the message names the file and says how to fix it."""


class ImageError(ValueError):
    """One image (file, series folder or mask) that cannot be read; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
