"""predict's classification outputs: P(class), the decision, Grad-CAM maps and DICOM captures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.dataset import Dataset

from client.predict.grid import to_source, write_map
from client.predict.inputs import Inputs, Item
from client.predict.model import Predictor
from client.predict.writer import PREDICTIONS, Loaded, _class_names, _source_datasets, _Writer
from common.data.image import grey_slices
from common.metrics import classification_metrics


class _ClassifyWriter(_Writer):
    """Scores, decisions, Grad-CAM maps and Secondary Captures of a classifier."""

    def __init__(self, predictor: Predictor, inputs: Inputs, data: Path, out: Path,
                 device: torch.device, *, explain: bool) -> None:
        super().__init__(predictor, inputs, out, device)
        self.explain = explain
        self.classes = self.cfg.num_classes
        self.names = _class_names(data, self.classes, "labels")
        self.scores: list[np.ndarray] = []
        self.labels: list[int] = []
        self.series_uid: str | None = None

    def write(self, batch: list[Loaded]) -> None:
        images = np.concatenate([b.image.pixels for b in batch])
        probs = self.probabilities(images)
        maps = self._saliency(images, probs) if self.explain else None
        start = 0
        for loaded in batch:
            count = len(loaded.image.pixels)
            self._row(loaded, probs[start : start + count],
                      None if maps is None else maps[start : start + count])
            start += count

    def _decision(self, p: np.ndarray) -> int:
        if self.classes == 2:
            return int(p[1] >= self.predictor.threshold)
        return int(p.argmax())

    def _saliency(self, images: np.ndarray, probs: np.ndarray) -> np.ndarray:
        from client.predict.saliency import saliency_maps

        # binary: where the positive class comes from, whatever the decision; else the
        # predicted class of each slice
        target: int | np.ndarray = 1 if self.classes == 2 else probs.argmax(axis=1)
        return saliency_maps(self.predictor.model, images, self.device, target=target)

    def _row(self, loaded: Loaded, probs: np.ndarray, maps: np.ndarray | None) -> None:
        item, meta = loaded.item, loaded.image.meta
        # one answer per image: a volume's (or multi-frame file's) slices are averaged
        p = probs.mean(axis=0)
        decision = self._decision(p)
        row: dict[str, Any] = {"path": item.name}
        if self.classes == 2:
            row["score"] = f"{p[1]:.6f}"
            row["threshold"] = f"{self.predictor.threshold:.6f}"
            row["decision"] = "positive" if decision == 1 else "negative"
        else:
            row.update({f"p_{k}": f"{p[k]:.6f}" for k in range(self.classes)})
            row["decision"] = self.names[decision]
        row["class"] = self.names[decision]
        if item.label is not None:
            row["label"] = item.label
            self.scores.append(p)
            self.labels.append(item.label)
        row["saliency"] = ""
        row["dicom"] = ""
        if maps is not None:
            stem = self.stem(item)
            heat = to_source(maps[:, None], meta.rows, meta.cols)[:, 0]
            path = write_map(self.out / "saliency" / f"{stem}.nii.gz", heat, item.path)
            row["saliency"] = self.relative(path)
            sources = _source_datasets(item)
            if sources is not None:
                row["dicom"] = self.relative(self._capture(item, sources, heat, probs, p, stem))
        self.rows.append(row)
        self.count += 1

    def _capture(self, item: Item, sources: list[Dataset], heat: np.ndarray,
                 probs: np.ndarray, p: np.ndarray, stem: str) -> Path:
        from highdicom import UID

        from client.predict.dicom import overlay, write_secondary_capture

        target = 1 if self.classes == 2 else int(p.argmax())
        index = int(probs[:, target].argmax())  # the slice that speaks most for the class
        grey = grey_slices(item.path)[index]
        source = sources[index] if len(sources) == len(probs) else sources[0]
        decision = self._decision(p)
        if self.classes == 2:
            said = f"{self.names[1]} {p[1]:.2f} {'positive' if decision else 'negative'}"
        else:
            said = f"{self.names[decision]} {p[decision]:.2f}"
        self.series_uid = self.series_uid or str(UID())
        return write_secondary_capture(
            source, overlay(grey, heat[index]), self.out / "dicom",
            description=f"medfed {said}", series_uid=self.series_uid,
            instance_number=self.count + 1,
        )

    def outputs(self) -> dict[str, str]:
        found = {"predictions": PREDICTIONS}
        for folder in ("saliency", "dicom"):
            if (self.out / folder).is_dir():
                found[folder] = f"{folder}/"
        return found

    def metrics(self) -> dict[str, float] | None:
        if not self.labels:
            return None
        scores = classification_metrics(
            np.stack(self.scores), np.asarray(self.labels),
            threshold=self.predictor.threshold if self.classes == 2 else None,
        )
        scores["threshold"] = self.predictor.threshold
        scores["images"] = float(len(self.labels))
        return scores
