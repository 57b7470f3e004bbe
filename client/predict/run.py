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

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.predict.classify_out import _ClassifyWriter
from client.predict.inputs import OUTPUT_MARK, Inputs, Item, find_inputs
from client.predict.model import Predictor, load_predictor
from client.predict.segment_out import _SegmentWriter
from client.predict.writer import PREDICTIONS, VOLUME_BATCH, Loaded, _Writer
from common.data.errors import ImageError, as_image_error, is_file_failure
from common.data.image import decode_mask, load_image
from common.data.preprocess import Preprocess
from common.outputs import remove, write_json
from common.training.loop import resolve_device
from common.volumes import MIN_SLICES

METRICS = "metrics.json"
SUMMARY = "summary.json"

Advance = Callable[[int], None]


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


def _writer_for(
    predictor: Predictor, inputs: Inputs, data: Path, out: Path, *, explain: bool,
    device: torch.device,
) -> _Writer:
    if predictor.cfg.task == "segment":
        return _SegmentWriter(predictor, inputs, data, out, device)
    return _ClassifyWriter(predictor, inputs, data, out, device, explain=explain)
