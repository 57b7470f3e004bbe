"""`medfed predict`: a trained model over a folder of images, with outputs a hospital can use.

For every readable image or volume of --data, one row of OUT/predictions.csv and, by task:

- classification: P(class) and the decision at the model's operating point; with saliency on,
  a Grad-CAM map as NIfTI on the image's grid (`saliency/`) and, for DICOM sources, a Secondary
  Capture with the map overlaid on the slice the model found most telling (`dicom/`);
- segmentation: the label map and foreground probabilities as NIfTI on the image's grid
  (`masks/`, `probabilities/`) and, for DICOM sources, one DICOM SEG per source series
  (`dicom/`) that references the instances it segments.

Images are read by the same code that trains (`common.data`), prepared as the run prepared them
(size, channels, slice axis) and predicted in batches; a file that cannot be read is named in
the summary and skipped. With labels (a site folder), OUT/metrics.json scores the predictions.
Nothing here opens a connection: every output stays in OUT, at the site.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset

from client.predict.grid import depth_to_source, to_source, write_map
from client.predict.inputs import OUTPUT_MARK, Inputs, Item, find_inputs
from client.predict.model import Predictor, load_predictor
from common.data.dicom import series_headers
from common.data.errors import ImageError, as_image_error, is_file_failure
from common.data.image import LoadedImage, decode_mask, grey_slices, load_image
from common.data.nifti import is_nifti
from common.data.preprocess import Preprocess
from common.metrics import classification_metrics
from common.outputs import remove, write_json
from common.segmentation import overlap_metrics, surface_metrics
from common.training.loop import resolve_device
from common.training.patches import SlidingWindow
from common.volumes import MIN_SLICES, resample_depth

PREDICTIONS = "predictions.csv"
METRICS = "metrics.json"
SUMMARY = "summary.json"
INFO_FILE = "dataset_info.json"  # what `medfed synth` (and a careful site) says labels mean
# volumes per forward pass of a --dims 3 model
VOLUME_BATCH = 2

Advance = Callable[[int], None]


@dataclass
class Loaded:
    """One readable item as the model sees it, with its mask on the model's grid if labelled."""

    item: Item
    image: LoadedImage
    mask: np.ndarray | None = None  # (S, n, n) int64
    note: str | None = None  # why a listed mask was not used


@dataclass
class Summary:
    """What one predict call did: counts, the files it skipped and where everything is."""

    model: str
    task: str
    predicted: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    ignored: int = 0
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able."""
        return {
            "model": self.model, "task": self.task, "predicted": self.predicted,
            "skipped": self.skipped, "ignored_files": self.ignored, "outputs": self.outputs,
            "metrics": self.metrics, "warnings": self.warnings,
        }


def predict(
    model_or_run: Path, data: Path, out: Path, *, explain: bool = True, device: str = "auto",
    batch_size: int = 32, advance: Advance | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Summary:
    """Apply the model of `model_or_run` to every image of `data`; outputs into `out`.

    explain: saliency maps and their Secondary Captures (classifiers); off: scores only.
    advance: called with the number of items done after each batch (a progress bar);
    on_start: called once with the number of items found.
    Raises ConfigError / FileNotFoundError / UnsafeModelFile for unusable arguments, and
    ImageError when not one image could be read.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    predictor = load_predictor(model_or_run)
    inputs = find_inputs(data, skip=out)
    torch_device = resolve_device(device)
    predictor.model.to(torch_device)
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUT_MARK).write_text("medfed predict outputs: not read as input by later calls\n")
    writer = _writer_for(predictor, inputs, data, out, explain=explain, device=torch_device)
    summary = Summary(model=str(predictor.source), task=predictor.cfg.task,
                      ignored=len(inputs.ignored))
    if on_start is not None:
        on_start(len(inputs.items))
    for batch, failures in _batches(inputs, predictor, batch_size):
        summary.skipped += failures
        if batch:
            writer.write(batch)
            summary.warnings += [loaded.note for loaded in batch if loaded.note]
        if advance is not None:
            advance(len(batch) + len(failures))
    summary.predicted = writer.count
    if summary.predicted == 0:
        raise ImageError(
            f"--data {data}: none of its {len(inputs.items)} images could be read "
            f"(first: {summary.skipped[0]['path']}: {summary.skipped[0]['reason']}); "
            "run `medfed check-data` on the folder to see why"
        )
    summary.warnings += writer.finish()
    summary.outputs = writer.outputs()
    summary.metrics = writer.metrics()
    if summary.metrics is not None:
        write_json(out / METRICS, summary.metrics)
        summary.outputs["metrics"] = METRICS
    write_json(out / SUMMARY, summary.to_dict())
    return summary


# what a predict call writes into --out; `--force` removes these and nothing else
OUTPUTS = (
    PREDICTIONS, METRICS, SUMMARY, "saliency", "masks", "probabilities", "dicom", OUTPUT_MARK,
)


def clear_outputs(out: Path) -> None:
    """Remove an earlier predict call's outputs from `out` (other files stay).

    Not the run-folder manifest's `--force` (common.outputs.prepare): pointed at a run folder
    by mistake, that would delete the run; this deletes predict's own names only.
    """
    remove(out, OUTPUTS)


def _batches(
    inputs: Inputs, predictor: Predictor, batch_size: int
) -> Iterator[tuple[list[Loaded], list[dict[str, str]]]]:
    """Readable items in groups of about `batch_size` slices (volumes: VOLUME_BATCH items)."""
    cfg = predictor.cfg
    pre = Preprocess(image_size=cfg.image_size, channels=cfg.channels)
    masks = inputs.labelled and cfg.task == "segment"
    batch: list[Loaded] = []
    failures: list[dict[str, str]] = []
    held = 0
    limit = VOLUME_BATCH if cfg.dims == 3 else batch_size
    for item in inputs.items:
        try:
            loaded = _load(item, pre, masks=masks, dims=cfg.dims)
        # one file's failure of any kind (a codec's panic too) skips that file, named
        except BaseException as exc:
            if not is_file_failure(exc):
                raise
            failures.append({"path": item.name, "reason": as_image_error(exc).reason})
            continue
        batch.append(loaded)
        held += 1 if cfg.dims == 3 else len(loaded.image.pixels)
        if held >= limit:
            yield batch, failures
            batch, failures, held = [], [], 0
    if batch or failures:
        yield batch, failures


def _load(item: Item, pre: Preprocess, *, masks: bool, dims: int) -> Loaded:
    image = load_image(item.path, pre)
    if dims == 3 and len(image.pixels) < MIN_SLICES:
        raise ImageError(
            f"{len(image.pixels)} slice: this model segments volumes (--dims 3); pass DICOM "
            "series folders or 3D NIfTI files"
        )
    mask, note = None, None
    if masks and item.mask is not None:
        # a broken mask costs the image its score, not its prediction
        try:
            decoded = decode_mask(item.mask, pre, like=image.meta, image=item.path)[0]
            mask = decoded[:, 0].astype(np.int64)
        except BaseException as exc:
            if not is_file_failure(exc):
                raise
            note = (f"{item.name}: its mask cannot be used ({as_image_error(exc).reason}); "
                    "predicted, not scored")
    return Loaded(item, image, mask, note)


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


def _writer_for(
    predictor: Predictor, inputs: Inputs, data: Path, out: Path, *, explain: bool,
    device: torch.device,
) -> _Writer:
    if predictor.cfg.task == "segment":
        return _SegmentWriter(predictor, inputs, data, out, device)
    return _ClassifyWriter(predictor, inputs, data, out, device, explain=explain)


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
