"""The data card: what `medfed check-data SITE_DIR` tells a hospital about its folder."""

from __future__ import annotations

import textwrap
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.data.alignment import CONVENTION_NOTE, ITK_CONVENTION
from common.data.duplicates import find_duplicates
from common.data.errors import DataError, Problem
from common.data.labels import SPLITS
from common.data.preprocess import Preprocess
from common.data.site import UNLABELLED, SiteData
from common.data.volume import ImageMeta
from common.registry import Task

WIDTH = 100
DEFAULT_PREPROCESS = Preprocess()
# What a training row of each --task needs (common.training.tasks): a label, a mask or an image.
TASK_NEEDS: dict[str, str] = {Task.classify: "labels", Task.synthesize: "labels",
                              Task.segment: "masks", Task.autoencode: "images"}
# Rows listed one per line in the text card; the JSON always lists every one.
_LISTED = 20


@dataclass
class DataCard:
    """A site's data summary; `usable` is False only when nothing can be trained on.

    rows_per_class / samples_per_class: per split, class -> count of labels.csv rows (all
    rows) and of decoded samples (slices of readable images). Distributions (modalities,
    sizes, ...) count readable images.
    task / num_classes: what the card was checked for (None: a general check).
    mask_rows: per split, readable rows whose mask is usable; mask_values: every value found
    in those masks; mask_placements: how those masks were put on their images' grids
    (common.data.alignment: resampled through patient frames, ITK's 2D convention, ...).
    labels_out_of_range: rows whose label is not below num_classes ({path, split, label}).
    masks_out_of_range: masks holding a value not below num_classes ({path, row, max}).
    duplicates: rows holding the same image ({paths, splits, labels, match});
    cross_split_duplicates: how many of them span two splits (a train/test leak).
    """

    site: str
    usable: bool
    reasons: list[str]
    warnings: list[str] = field(default_factory=list)
    preprocess: dict[str, Any] = field(default_factory=dict)
    rows: int = 0
    readable_rows: int = 0
    rows_per_class: dict[str, dict[int, int]] = field(default_factory=dict)
    samples_per_class: dict[str, dict[int, int]] = field(default_factory=dict)
    unlabelled_rows: int = 0
    unlabelled_samples: int = 0
    modalities: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    slices: dict[str, int] = field(default_factory=dict)
    pixel_spacings: dict[str, int] = field(default_factory=dict)
    transfer_syntaxes: dict[str, int] = field(default_factory=dict)
    photometrics: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    task: str | None = None
    num_classes: int | None = None
    mask_rows: dict[str, int] = field(default_factory=dict)
    mask_values: list[int] = field(default_factory=list)
    mask_placements: dict[str, int] = field(default_factory=dict)
    labels_out_of_range: list[dict[str, Any]] = field(default_factory=list)
    masks_out_of_range: list[dict[str, Any]] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    cross_split_duplicates: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (class ids become string keys, as JSON requires)."""
        data = asdict(self)
        for name in ("rows_per_class", "samples_per_class"):
            data[name] = {
                split: {str(k): v for k, v in classes.items()}
                for split, classes in data[name].items()
            }
        return data

    def to_text(self) -> str:
        """Return the card as plain text that fits a 100-column terminal."""
        status = "USABLE" if self.usable else "NOT USABLE"
        lines = [f"medfed data card: site {self.site}: {status}"]
        lines += _wrapped("preprocess: ", _pairs(self.preprocess, "="))
        lines.append(
            f"labels.csv: {self.rows} rows ({self.unlabelled_rows} unlabelled), "
            f"{self.readable_rows} readable, skipped files: {len(self.problems)}"
        )
        for reason in self.reasons:
            lines += _wrapped("NOT USABLE: ", reason)
        for warning in self.warnings:
            lines += _wrapped("warning: ", warning)
        if self.rows_per_class:
            lines += ["", f"{'split':<7}{'class':<12}{'rows':>10}{'samples':>12}"]
            for split in SPLITS:
                rows = self.rows_per_class.get(split, {})
                samples = self.samples_per_class.get(split, {})
                for label in sorted(set(rows) | set(samples)):
                    name = "unlabelled" if label < 0 else str(label)
                    lines.append(
                        f"{split:<7}{name:<12}{rows.get(label, 0):>10}{samples.get(label, 0):>12}"
                    )
            lines.append("")
        if any(self.mask_rows.values()):
            lines += _wrapped("masks (usable rows): ", _pairs(self.mask_rows, ": ")
                              + f"; values {', '.join(map(str, self.mask_values))}")
        if self.mask_placements:
            lines += _wrapped("masks placed by: ", _pairs(self.mask_placements, ": "))
        if ITK_CONVENTION in self.mask_placements:
            lines += _wrapped("note: ", CONVENTION_NOTE)
        for title, counts in (
            ("modalities", self.modalities),
            ("sizes (rows x cols)", self.sizes),
            ("slices per image", self.slices),
            ("pixel spacing (mm)", self.pixel_spacings),
            ("transfer syntaxes", self.transfer_syntaxes),
            ("photometric", self.photometrics),
        ):
            if counts:
                lines += _wrapped(f"{title}: ", _pairs(counts, ": "))
        lines += _listing(
            f"labels outside 0..{(self.num_classes or 0) - 1} (--num-classes {self.num_classes})",
            [f"{r['path']} ({r['split']}): label {r['label']}" for r in self.labels_out_of_range],
        )
        lines += _listing(
            f"masks with values outside 0..{(self.num_classes or 0) - 1}",
            [f"{m['path']} (row {m['row']}): up to {m['max']}" for m in self.masks_out_of_range],
        )
        lines += _listing(
            "duplicate images", [f"{d['match']}: {_copies(d)}" for d in self.duplicates]
        )
        if self.problems:
            lines.append(f"skipped files ({len(self.problems)}):")
            for problem in self.problems:
                lines += _wrapped("  ", str(problem), indent="      ")
        return "\n".join(lines)


def check_site(
    site_dir: Path,
    pre: Preprocess = DEFAULT_PREPROCESS,
    *,
    seed: int = 0,
    cache_dir: Path | None = None,
    masks: bool = True,
    task: str | None = None,
    num_classes: int | None = None,
    duplicates: bool = True,
) -> DataCard:
    """Decode every file of a site (through the cache) and summarise it in a DataCard.

    Never raises for bad input: an unusable labels.csv becomes usable=False with the reason.

    Args:
        masks: decode each row's mask where labels.csv lists one and check it against its
            image (geometry, grid, values); a row whose mask fails is skipped, as a segmentation
            run skips it. False for tasks that ignore masks (faster).
        task: judge usability for this --task (TASK_NEEDS); None: labelled images are needed.
        num_classes: the run's class count: labels (and mask values) must be below it.
        duplicates: look for the same image listed twice (content hash, SOP Instance UID).

    """
    site_dir = Path(site_dir)
    if task is not None and task not in TASK_NEEDS:
        raise ValueError(f"task must be one of {', '.join(TASK_NEEDS)}, got {task!r}")
    masks = masks or TASK_NEEDS.get(task or "") == "masks"
    try:
        data = SiteData(site_dir, pre, seed=seed, cache_dir=cache_dir, masks=masks)
    except DataError as e:
        return DataCard(
            site=site_dir.resolve().name, usable=False, reasons=[str(e)],
            preprocess=pre.to_dict(), task=task, num_classes=num_classes,
        )

    card = DataCard(
        site=data.name, usable=True, reasons=[], preprocess=pre.to_dict(), rows=len(data.rows),
        task=task, num_classes=num_classes,
    )
    rows_per_class = {split: Counter[int]() for split in SPLITS}
    samples_per_class = {split: Counter[int]() for split in SPLITS}
    for row in data.rows:
        rows_per_class[row.split][UNLABELLED if row.label is None else row.label] += 1
    distributions: dict[str, Counter[str]] = defaultdict(Counter)
    mask_rows = Counter[str]()
    placements = Counter[str]()
    mask_values: set[int] = set()
    readable = []
    for loaded in data.iter_rows("all"):
        row = data.rows[loaded.row_index]
        readable.append(row)
        label = UNLABELLED if row.label is None else row.label
        samples_per_class[row.split][label] += len(loaded.image.pixels)
        card.readable_rows += 1
        for name, value in _facets(loaded.image.meta).items():
            distributions[name][value] += 1
        if loaded.mask is not None:
            mask_rows[row.split] += 1
            placements[loaded.placement or "shape"] += 1
            values = {int(v) for v in np.unique(loaded.mask)}
            mask_values |= values
            if num_classes is not None and max(values) >= num_classes:
                card.masks_out_of_range.append(
                    {"path": row.mask, "row": row.path, "max": max(values)}
                )
    card.mask_rows = {split: mask_rows[split] for split in SPLITS} if mask_rows else {}
    card.mask_values = sorted(mask_values)
    card.mask_placements = dict(placements.most_common())
    if num_classes is not None:
        card.labels_out_of_range = [
            {"path": r.path, "split": r.split, "label": r.label}
            for r in data.rows if r.label is not None and r.label >= num_classes
        ]
    if duplicates:
        found = find_duplicates(site_dir, readable)
        card.duplicates = [
            {"paths": list(d.paths), "splits": list(d.splits), "labels": list(d.labels),
             "match": d.match}
            for d in found
        ]
        card.cross_split_duplicates = sum(d.across_splits for d in found)

    card.rows_per_class = {s: dict(sorted(c.items())) for s, c in rows_per_class.items()}
    card.samples_per_class = {s: dict(sorted(c.items())) for s, c in samples_per_class.items()}
    card.unlabelled_rows = sum(c[UNLABELLED] for c in rows_per_class.values())
    card.unlabelled_samples = sum(c[UNLABELLED] for c in samples_per_class.values())
    card.modalities = dict(distributions["modalities"].most_common())
    card.sizes = dict(distributions["sizes"].most_common())
    card.slices = dict(distributions["slices"].most_common())
    card.pixel_spacings = dict(distributions["pixel_spacings"].most_common())
    card.transfer_syntaxes = dict(distributions["transfer_syntaxes"].most_common())
    card.photometrics = dict(distributions["photometrics"].most_common())
    card.problems = list(data.problems)
    _judge(card)
    return card


def _facets(meta: ImageMeta) -> dict[str, str]:
    """Return the value each card distribution counts for one image."""
    spacing = meta.pixel_spacing
    return {
        "modalities": meta.modality or f"none ({meta.transfer_syntax})",
        "sizes": f"{meta.rows}x{meta.cols}",
        "slices": str(meta.slices),
        "pixel_spacings": f"{spacing[0]:.3g}x{spacing[1]:.3g}" if spacing else "unknown",
        "transfer_syntaxes": meta.transfer_syntax,
        "photometrics": meta.photometric or f"none ({meta.transfer_syntax})",
    }


def _judge(card: DataCard) -> None:
    """Decide usability and collect warnings from the counts."""
    needs = TASK_NEEDS.get(card.task or "", "labels")
    train = {k: v for k, v in card.samples_per_class["train"].items() if k >= 0}
    train_rows = sum(card.rows_per_class["train"].values())
    if needs == "labels" and not train:
        card.usable = False
        card.reasons.append(
            f"no readable labelled training image ({train_rows} training rows in labels.csv); "
            "fix the skipped files below or label some training rows"
        )
    elif needs == "images" and not card.samples_per_class["train"]:
        card.usable = False
        card.reasons.append(
            f"no readable training image ({train_rows} training rows in labels.csv); "
            "fix the skipped files below"
        )
    elif needs == "masks" and not card.mask_rows.get("train"):
        card.usable = False
        card.reasons.append(
            f"no readable training image with a usable mask ({train_rows} training rows in "
            "labels.csv); fix the skipped files and masks below or list masks in the mask column"
        )
    _judge_classes(card, needs)
    _judge_duplicates(card)
    if needs == "labels" and len(train) == 1:
        card.warnings.append(
            f"training split has a single class ({next(iter(train))}); the site can still "
            "join federated training, but its updates will be strongly non-IID"
        )
    for split in ("val", "test"):
        if not any(k >= 0 for k in card.samples_per_class[split]):
            card.warnings.append(
                f"no readable labelled {split} image; local {split} metrics will be missing"
            )
        unseen = sorted(k for k in card.samples_per_class[split] if k >= 0 and k not in train)
        if unseen and train:
            card.warnings.append(
                f"{split} has classes never seen in training: {', '.join(map(str, unseen))}"
            )
    if card.problems:
        card.warnings.append(f"skipped files: {len(card.problems)}; reasons listed below")
    if card.unlabelled_rows:
        card.warnings.append(
            f"unlabelled rows: {card.unlabelled_rows}; they are not used for supervised training"
        )


def _judge_classes(card: DataCard, needs: str) -> None:
    """Labels and mask values against --num-classes; without it, class ids that skip numbers."""
    n = card.num_classes
    if n is not None and needs == "labels" and card.labels_out_of_range:
        bad = card.labels_out_of_range
        top = max(r["label"] for r in bad)
        card.usable = False
        card.reasons.append(
            f"{len(bad)} labels.csv row(s) have a label outside 0..{n - 1} (--num-classes {n}), "
            f"up to {top}: {_first(r['path'] for r in bad)}; fix those labels "
            "(class ids are 0..num-classes-1) or run with more classes"
        )
    if n is not None and card.masks_out_of_range:
        top = max(m["max"] for m in card.masks_out_of_range)
        text = (
            f"{len(card.masks_out_of_range)} mask(s) hold values outside 0..{n - 1} "
            f"(--num-classes {n}, background included), up to {top}: "
            f"{_first(m['path'] for m in card.masks_out_of_range)}; renumber the mask labels "
            f"or segment with --num-classes {top + 1}"
        )
        if needs == "masks":
            card.usable = False
            card.reasons.append(text)
        else:
            card.warnings.append(text + " (only segmentation uses masks)")
    labels = sorted({k for split in card.rows_per_class.values() for k in split if k >= 0})
    if n is None and needs == "labels" and labels and labels[-1] != len(labels) - 1:
        # A label 7 among 0s and 1s (or 10**12) is a typo more often than a class: a model
        # sized for it would carry outputs that never see an example.
        unused = labels[-1] + 1 - len(labels)
        card.warnings.append(
            f"class ids are not 0..{len(labels) - 1}: found {_first(map(str, labels))}, so a "
            f"model needs {labels[-1] + 1} outputs of which {unused} never see an example; "
            "check labels.csv, and pass --num-classes to check labels against the run's classes"
        )


def _judge_duplicates(card: DataCard) -> None:
    leaks = [d for d in card.duplicates if len(set(d["splits"])) > 1]
    if leaks:
        card.warnings.append(
            f"LEAK: {len(leaks)} image(s) appear in more than one split (listed below): a "
            "model is tested on images it trained on, so this site's val/test metrics are "
            "inflated; keep each image in one split (remove the copies from labels.csv)"
        )
    within = len(card.duplicates) - len(leaks)
    if within:
        card.warnings.append(
            f"{within} image(s) are listed more than once within a split (listed below); "
            "they weigh double in training"
        )


def _first(items: Any, count: int = 5) -> str:
    """The first `count` items, comma-separated, and how many more there are."""
    items = list(items)
    more = f" and {len(items) - count} more" if len(items) > count else ""
    return ", ".join(str(i) for i in items[:count]) + more


def _copies(duplicate: dict[str, Any]) -> str:
    labels = duplicate["labels"]
    return ", ".join(
        f"{path} ({split}{f', label {label}' if len(set(labels)) > 1 else ''})"
        for path, split, label in zip(duplicate["paths"], duplicate["splits"], labels, strict=True)
    )


def _listing(title: str, entries: list[str]) -> list[str]:
    """A titled list of at most _LISTED entries (the JSON card has them all)."""
    if not entries:
        return []
    lines = [f"{title} ({len(entries)}):"]
    for entry in entries[:_LISTED]:
        lines += _wrapped("  ", entry, indent="      ")
    if len(entries) > _LISTED:
        lines.append(f"  ... and {len(entries) - _LISTED} more (--json lists every one)")
    return lines


def _pairs(counts: dict[str, Any], sep: str) -> str:
    return ", ".join(f"{k}{sep}{v}" for k, v in counts.items())


def _wrapped(prefix: str, text: str, indent: str | None = None) -> list[str]:
    return textwrap.wrap(
        text,
        width=WIDTH,
        initial_indent=prefix,
        subsequent_indent=indent if indent is not None else " " * min(len(prefix), 8),
        break_on_hyphens=False,
    ) or [prefix.rstrip()]
