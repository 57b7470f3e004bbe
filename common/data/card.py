"""The data card: what `medfed check-data SITE_DIR` tells a hospital about its folder."""

from __future__ import annotations

import textwrap
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.data.errors import DataError, Problem
from common.data.labels import SPLITS
from common.data.preprocess import Preprocess
from common.data.site import UNLABELLED, SiteData
from common.data.volume import ImageMeta

WIDTH = 100
DEFAULT_PREPROCESS = Preprocess()


@dataclass
class DataCard:
    """A site's data summary; `usable` is False only when nothing can be trained on.

    rows_per_class / samples_per_class: per split, class -> count of labels.csv rows (all
    rows) and of decoded samples (slices of readable images). Distributions (modalities,
    sizes, ...) count readable images.
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
    masks: bool = False,
) -> DataCard:
    """Decode every file of a site (through the cache) and summarise it in a DataCard.

    Never raises for bad input: an unusable labels.csv becomes usable=False with the reason.

    Args:
        masks: also decode and check each row's mask (for tasks that train on masks).
    """
    site_dir = Path(site_dir)
    try:
        data = SiteData(site_dir, pre, seed=seed, cache_dir=cache_dir, masks=masks)
    except DataError as e:
        return DataCard(
            site=site_dir.resolve().name, usable=False, reasons=[str(e)], preprocess=pre.to_dict()
        )

    card = DataCard(
        site=data.name, usable=True, reasons=[], preprocess=pre.to_dict(), rows=len(data.rows)
    )
    rows_per_class = {split: Counter[int]() for split in SPLITS}
    samples_per_class = {split: Counter[int]() for split in SPLITS}
    for row in data.rows:
        rows_per_class[row.split][UNLABELLED if row.label is None else row.label] += 1
    distributions: dict[str, Counter[str]] = defaultdict(Counter)
    for loaded in data.iter_rows("all"):
        row = data.rows[loaded.row_index]
        label = UNLABELLED if row.label is None else row.label
        samples_per_class[row.split][label] += len(loaded.image.pixels)
        card.readable_rows += 1
        for name, value in _facets(loaded.image.meta).items():
            distributions[name][value] += 1

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
    train = {k: v for k, v in card.samples_per_class["train"].items() if k >= 0}
    if not train:
        card.usable = False
        train_rows = sum(card.rows_per_class["train"].values())
        card.reasons.append(
            f"no readable labelled training image ({train_rows} training rows in labels.csv); "
            "fix the skipped files below or label some training rows"
        )
    elif len(train) == 1:
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
