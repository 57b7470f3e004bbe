"""predict's segmentation outputs: label maps, probabilities, DICOM SEG and overlap scores."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.dataset import Dataset

from client.predict.grid import depth_to_source, to_source, write_map
from client.predict.inputs import Inputs
from client.predict.model import Predictor
from client.predict.writer import PREDICTIONS, Loaded, _class_names, _source_datasets, _Writer
from common.segmentation import overlap_metrics, surface_metrics
from common.volumes import resample_depth


class _SegmentWriter(_Writer):
    """Label maps, probabilities and DICOM SEG objects of a segmenter."""

    def __init__(self, predictor: Predictor, inputs: Inputs, data: Path, out: Path,
                 device: torch.device) -> None:
        super().__init__(predictor, inputs, out, device)
        self.classes = self.cfg.num_classes
        self.names = _class_names(data, self.classes, "mask_labels")
        self.predicted: list[np.ndarray] = []
        self.truth: list[np.ndarray] = []
        # series UID -> (instance, its labels on the source grid, the row that points at it)
        self.pending: dict[str, list[tuple[Dataset, np.ndarray, dict[str, Any]]]] = (
            defaultdict(list)
        )
        self.warnings: list[str] = []

    def write(self, batch: list[Loaded]) -> None:
        size = self.cfg.image_size
        if self.cfg.dims == 3:
            volumes = np.stack([resample_depth(b.image.pixels, size) for b in batch])
            per_volume = self.probabilities(volumes)  # (N, K, D, n, n)
            slices = [depth_to_source(p, len(b.image.pixels))
                      for p, b in zip(per_volume, batch, strict=True)]
        else:
            probs = self.probabilities(np.concatenate([b.image.pixels for b in batch]))
            bounds = np.cumsum([0] + [len(b.image.pixels) for b in batch])
            slices = [probs[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        for loaded, model_grid in zip(batch, slices, strict=True):
            self._row(loaded, model_grid)

    def _row(self, loaded: Loaded, model_grid: np.ndarray) -> None:
        item, meta = loaded.item, loaded.image.meta
        if loaded.mask is not None:
            self.predicted.append(model_grid.argmax(axis=1))
            self.truth.append(loaded.mask)
        probs = to_source(model_grid, meta.rows, meta.cols)  # (S, K, R, C)
        labels = probs.argmax(axis=1).astype(np.uint8)
        stem = self.stem(item)
        mask_path = write_map(self.out / "masks" / f"{stem}.nii.gz", labels, item.path)
        prob_path = write_map(
            self.out / "probabilities" / f"{stem}.nii.gz",
            np.moveaxis(probs[:, 1:], 1, -1), item.path,
        )
        row: dict[str, Any] = {"path": item.name, "mask": self.relative(mask_path),
                               "probabilities": self.relative(prob_path), "dicom": ""}
        for k in range(1, self.classes):
            row[f"pixels_{k}"] = int(np.count_nonzero(labels == k))
        if loaded.mask is not None:
            scores = overlap_metrics(model_grid.argmax(axis=1), loaded.mask, self.classes)
            row["dice"] = "" if math.isnan(scores["dice"]) else f"{scores['dice']:.4f}"
        self.rows.append(row)
        self.count += 1
        sources = _source_datasets(item)
        if sources is None:
            return
        if len(sources) == 1 and len(labels) > 1:  # a multi-frame instance: a SEG of its own
            self._seg(str(sources[0].SeriesInstanceUID), [(sources[0], labels, row)])
            return
        for ds, plane in zip(sources, labels, strict=True):
            self.pending[str(ds.SeriesInstanceUID)].append((ds, plane[None], row))
        if item.path.is_dir():  # a series folder is its whole series: write it now
            uid = str(sources[0].SeriesInstanceUID)
            self._seg(uid, self.pending.pop(uid))

    def _seg(self, series: str, parts: list[tuple[Dataset, np.ndarray, dict[str, Any]]]) -> None:
        from client.predict.dicom import write_seg

        classes = {k: self.names[k] for k in range(1, self.classes)}
        try:
            path = write_seg([ds for ds, _, _ in parts],
                             np.concatenate([labels for _, labels, _ in parts]),
                             classes, self.out / "dicom", version=_version())
        except ValueError as exc:
            if len(parts) > 1:  # instances of one series that differ: one SEG per instance
                for part in parts:
                    self._seg(series, [part])
                return
            self.warnings.append(f"no DICOM SEG for {parts[0][2]['path']}: {exc}")
            return
        for _, _, row in parts:
            row["dicom"] = self.relative(path)

    def finish(self) -> list[str]:
        for series in list(self.pending):
            self._seg(series, self.pending.pop(series))
        super().finish()
        return self.warnings

    def outputs(self) -> dict[str, str]:
        found = {"predictions": PREDICTIONS, "masks": "masks/", "probabilities": "probabilities/"}
        if (self.out / "dicom").is_dir():
            found["dicom"] = "dicom/"
        return found

    def metrics(self) -> dict[str, float] | None:
        if not self.truth:
            return None
        predicted = np.concatenate(self.predicted)
        truth = np.concatenate(self.truth)
        scores = overlap_metrics(predicted, truth, self.classes)
        scores.update(surface_metrics(predicted, truth, self.classes))
        scores["images"] = float(len(self.truth))
        return scores


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medfed")
    except PackageNotFoundError:
        return "unknown"
