"""What `medfed predict --data DIR` reads: a site folder (labels.csv) or a plain folder of images.

A site folder is read as training reads it (every split; labels and masks, when there, score the
predictions). A plain folder is walked: every NIfTI-family file is one image, a folder that holds
one multi-file DICOM series with a patient frame is one volume (its slices stacked as
`read_dicom` stacks them), and any other DICOM file is one image. Files that are neither are
counted, not read; hidden files are OS litter.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom

from common.data.labels import LABELS_FILE, read_labels
from common.data.nifti import is_nifti
from common.data.sniff import has_dicm_marker

# written by `medfed predict` into its --out: a folder holding it is output, never input
OUTPUT_MARK = ".medfed-predict"


@dataclass(frozen=True)
class Item:
    """One image or volume to predict on.

    path: the DICOM file, series folder or NIfTI file; name: how predictions.csv names it
    (relative to --data); label and mask: from labels.csv, None in a plain folder.
    """

    path: Path
    name: str
    label: int | None = None
    mask: Path | None = None


@dataclass(frozen=True)
class Inputs:
    """The items found, whether they came with labels, and the files that are not images."""

    items: list[Item]
    labelled: bool
    ignored: list[str]


def find_inputs(data: Path, *, skip: Path | None = None) -> Inputs:
    """The images of `data`: a site folder's rows in labels.csv order, or a walked plain folder.

    skip: a folder inside `data` not to walk (predict's own --out). Folders an earlier predict
    wrote (marked with OUTPUT_MARK) are not walked either: their maps are NIfTI files and their
    SEGs DICOM, and predicting on them would be predicting on predictions.
    Raises FileNotFoundError naming --data when it is not a folder or holds no image.
    """
    if not data.is_dir():
        raise FileNotFoundError(
            f"--data {data}: not a folder; pass a site folder (with labels.csv) or a folder of "
            "DICOM files, DICOM series folders or NIfTI files"
        )
    if (data / LABELS_FILE).is_file():
        rows = read_labels(data)
        items = [
            Item(data / row.path, row.path, row.label,
                 None if row.mask is None else data / row.mask)
            for row in rows
        ]
        return Inputs(items, labelled=any(r.label is not None or r.mask for r in rows),
                      ignored=[])
    items, ignored = _walk(data, None if skip is None else skip.resolve())
    if not items:
        raise FileNotFoundError(
            f"--data {data}: no DICOM or NIfTI image found ({len(ignored)} other files); pass a "
            "site folder (with labels.csv) or a folder of DICOM files or NIfTI volumes"
        )
    return Inputs(items, labelled=False, ignored=ignored)


def _walk(root: Path, skip: Path | None) -> tuple[list[Item], list[str]]:
    dicom: dict[Path, list[Path]] = defaultdict(list)
    items: list[Item] = []
    ignored: list[str] = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        if any((folder / OUTPUT_MARK).is_file() for folder in path.parents
               if folder.is_relative_to(root)):
            continue
        if is_nifti(path):
            # an Analyze pair is one image: its header names it
            if path.name.lower().removesuffix(".gz").endswith(".img") and _has_pair(path):
                continue
            items.append(Item(path, relative.as_posix()))
        elif path.suffix.lower() == ".dcm" or has_dicm_marker(path):
            dicom[path.parent].append(path)
        else:
            ignored.append(relative.as_posix())
    for folder, files in sorted(dicom.items()):
        if len(files) > 1 and _one_framed_series(files):
            items.append(Item(folder, folder.relative_to(root).as_posix() or "."))
        else:
            items += [Item(f, f.relative_to(root).as_posix()) for f in files]
    return sorted(items, key=lambda item: item.name), ignored


def _has_pair(path: Path) -> bool:
    stem = path.name[: path.name.lower().rindex(".img")]
    return any((path.parent / f"{stem}{suffix}").is_file() for suffix in (".hdr", ".HDR"))


def _one_framed_series(files: list[Path]) -> bool:
    """Whether the files are the slices of one series placed in the patient (a volume).

    Radiographs exported into one folder share no frame and stay separate images; a folder
    mixing series is read file by file rather than refused.
    """
    series = set()
    for file in files:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True, force=True)
            series.add(str(ds.SeriesInstanceUID))
            if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
                return False
        # an unreadable header: the file is read (and named as skipped) on its own
        except Exception:
            return False
    return len(series) == 1
