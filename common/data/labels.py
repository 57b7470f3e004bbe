"""Reading a site's labels.csv into validated rows, with a seeded train/val/test split.

labels.csv columns: ``path,label`` and optional ``mask,split``. Paths are relative to the site
folder. An empty label means unlabelled; an empty or absent split is assigned from a hash of
(seed, path), so adding rows to a site never moves the rows that were already there.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from common.data.errors import DataError

LABELS_FILE = "labels.csv"
SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("mask", "split")
DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)
_HEADER_HINT = "the first line must be the header path,label (optionally also mask,split)"


@dataclass(frozen=True)
class Row:
    """One line of labels.csv: an image path (relative to the site), its class and split."""

    path: str
    label: int | None
    mask: str | None
    split: str


def read_labels(site_dir: Path, *, seed: int = 0) -> list[Row]:
    """Read and validate ``site_dir/labels.csv``.

    seed: decides the split of rows whose split cell is empty or absent.
    Raises DataError naming the file, the line and the fix for anything malformed.
    """
    site_dir = Path(site_dir)
    csv_path = site_dir / LABELS_FILE
    if not site_dir.is_dir():
        raise DataError(f"{site_dir}: site folder does not exist or is not a folder")
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: not found; create it with {_HEADER_HINT}, one image per line")
    try:
        # utf-8-sig: spreadsheets often save a byte-order mark that would corrupt the header.
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            lines = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(
            f"{csv_path}: cannot be read as UTF-8 CSV ({e}); save it as CSV UTF-8"
        ) from e

    if not lines or not any(cell.strip() for cell in lines[0]):
        raise DataError(f"{csv_path}: file is empty; {_HEADER_HINT}")
    columns = _columns(csv_path, lines[0])

    rows: list[Row] = []
    first_line: dict[str, int] = {}
    for number, cells in enumerate(lines[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue  # blank lines are common at the end of hand-edited files
        row = _parse_row(csv_path, number, cells, columns, seed)
        if row.path in first_line:
            # A duplicate would be counted twice and, with explicit splits, could leak a
            # training image into the test set.
            raise DataError(
                f"{csv_path} line {number}: path {row.path!r} is already listed on line "
                f"{first_line[row.path]}; list each image once"
            )
        first_line[row.path] = number
        rows.append(row)
    return rows


def seeded_split(
    path: str, seed: int, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> str:
    """Return "train", "val" or "test" for `path`, stable for a given seed.

    The split depends only on (seed, path), not on the other rows, so growing a site's
    labels.csv keeps every existing image where it was.
    """
    digest = hashlib.sha256(f"{seed}\0{path}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"


def _columns(csv_path: Path, header: list[str]) -> dict[str, int]:
    names = [name.strip().lower() for name in header]
    for required in REQUIRED_COLUMNS:
        if required not in names:
            found = ", ".join(n for n in names if n) or "nothing"
            raise DataError(
                f"{csv_path} line 1: missing column {required!r} (found: {found}); {_HEADER_HINT}"
            )
    duplicated = sorted({n for n in names if n and names.count(n) > 1})
    if duplicated:
        raise DataError(
            f"{csv_path} line 1: column {duplicated[0]!r} appears more than once; "
            "keep one column of each name"
        )
    # Extra columns (notes, patient pseudonyms) are ignored rather than rejected: sites
    # often keep their own bookkeeping next to the contract columns.
    return {n: i for i, n in enumerate(names) if n in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}


def _parse_row(
    csv_path: Path, number: int, cells: list[str], columns: dict[str, int], seed: int
) -> Row:
    def cell(name: str) -> str:
        index = columns.get(name)
        return cells[index].strip() if index is not None and index < len(cells) else ""

    where = f"{csv_path} line {number}"
    path = _relative_path(where, "path", cell("path"))
    if path is None:
        raise DataError(f"{where}: empty path; give the image file or folder relative to the site")
    mask = _relative_path(where, "mask", cell("mask"))

    text = cell("label")
    label: int | None = None
    if text:
        try:
            label = int(text)
        except ValueError:
            raise DataError(
                f"{where}: label {text!r} is not an integer; use integer class ids (0, 1, ...) "
                "and keep class names elsewhere, or leave it empty for an unlabelled image"
            ) from None
        if label < 0:
            raise DataError(
                f"{where}: label {label} is negative; class ids start at 0 "
                "(leave the cell empty for an unlabelled image)"
            )

    split = cell("split").lower()
    if not split:
        split = seeded_split(path, seed)
    elif split not in SPLITS:
        raise DataError(
            f"{where}: split {cell('split')!r} is not one of train, val, test; "
            "fix it or leave it empty to have one assigned"
        )
    return Row(path=path, label=label, mask=mask, split=split)


def _relative_path(where: str, column: str, text: str) -> str | None:
    """Normalise a path cell to POSIX form; reject anything that could leave the site folder.

    The check is lexical (absolute paths and ".." parts) on purpose: sites legitimately
    symlink their image store into the site folder, so resolving links would reject them.
    """
    if not text:
        return None
    # Spreadsheets written on Windows use backslashes; no real image name contains one.
    posix = text.replace("\\", "/")
    pure = PurePosixPath(posix)
    if pure.is_absolute() or (len(posix) > 1 and posix[1] == ":") or ".." in pure.parts:
        raise DataError(
            f"{where}: {column} {text!r} points outside the site folder; give a path relative "
            "to the folder that holds labels.csv, without '..'"
        )
    normal = "/".join(part for part in pure.parts if part != ".")
    if not normal:
        raise DataError(f"{where}: {column} {text!r} names the site folder itself, not an image")
    return normal
