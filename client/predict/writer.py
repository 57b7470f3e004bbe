"""What predict writes for every task.

The items as the model sees them, predictions.csv, output names and the model's probabilities.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset

from client.predict.inputs import Inputs, Item
from client.predict.model import Predictor
from common.data.dicom import series_headers
from common.data.image import LoadedImage
from common.data.nifti import is_nifti
from common.training.patches import SlidingWindow

PREDICTIONS = "predictions.csv"


INFO_FILE = "dataset_info.json"  # what `medfed synth` (and a careful site) says labels mean
# volumes per forward pass of a --dims 3 model
VOLUME_BATCH = 2


@dataclass
class Loaded:
    """One readable item as the model sees it, with its mask on the model's grid if labelled."""

    item: Item
    image: LoadedImage
    mask: np.ndarray | None = None  # (S, n, n) int64
    note: str | None = None  # why a listed mask was not used


def _class_names(data: Path, cfg_classes: int, key: str) -> dict[int, str]:
    """Class id -> name from dataset_info.json beside --data (or its parent), else "class k"."""
    names = {k: f"class {k}" for k in range(cfg_classes)}
    for folder in (data, data.parent):
        info = folder / INFO_FILE
        if not info.is_file():
            continue
        try:
            given = json.loads(info.read_text()).get(key, {})
            names.update({int(k): str(v) for k, v in given.items() if 0 <= int(k) < cfg_classes})
        except (OSError, ValueError, TypeError, AttributeError):
            continue  # a damaged info file costs the names only
        break
    return names


def _stem(name: str) -> str:
    """A file name for an item's outputs: its path with folders joined and suffixes dropped."""
    base = name.replace("\\", "/").strip("/") or "image"
    for suffix in (".nii.gz", ".nii", ".dcm", ".mgz", ".mgh", ".hdr", ".img"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("/", "__").replace(" ", "_") or "image"


def _source_datasets(item: Item) -> list[Dataset] | None:
    """The DICOM instances behind an item's slices, in slice order; None for NIfTI."""
    if is_nifti(item.path):
        return None
    if item.path.is_dir():
        return [ds for _, ds in series_headers(item.path)[0]]
    return [pydicom.dcmread(item.path)]


class _Writer:
    """Shared by both tasks: the table, the output folders and unique file names."""

    def __init__(self, predictor: Predictor, inputs: Inputs, out: Path,
                 device: torch.device) -> None:
        self.predictor, self.inputs, self.out, self.device = predictor, inputs, out, device
        self.cfg = predictor.cfg
        self.rows: list[dict[str, Any]] = []
        self.count = 0
        self._stems: set[str] = set()

    def stem(self, item: Item) -> str:
        base = stem = _stem(item.name)
        n = 1
        while stem in self._stems:
            n += 1
            stem = f"{base}-{n}"
        self._stems.add(stem)
        return stem

    def relative(self, path: Path | None) -> str:
        return "" if path is None else path.relative_to(self.out).as_posix()

    def write(self, batch: list[Loaded]) -> None:
        raise NotImplementedError

    def finish(self) -> list[str]:
        """Everything written after the last batch; predictions.csv. Returns warnings."""
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        with (self.out / PREDICTIONS).open("w", newline="") as f:
            table = csv.DictWriter(f, fieldnames=columns, restval="")
            table.writeheader()
            table.writerows(self.rows)
        return []

    def outputs(self) -> dict[str, str]:
        return {"predictions": PREDICTIONS}

    def metrics(self) -> dict[str, float] | None:
        return None

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax over classes for (N, C, ...) inputs, in chunks, as float32 numpy."""
        model = SlidingWindow(self.predictor.model, self.cfg.patch()).eval()
        chunk = VOLUME_BATCH if images.ndim == 5 else max(len(images), 1)
        parts = []
        for i in range(0, len(images), chunk):
            x = torch.as_tensor(images[i : i + chunk], dtype=torch.float32).to(self.device)
            parts.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
        return np.concatenate(parts)
