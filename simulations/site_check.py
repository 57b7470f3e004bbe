"""Every site folder of a simulation checked before Ray starts, as `medfed site` checks its own.

Without it an unusable folder inside --data (a broken labels.csv, labels beyond the run's
classes, no readable training image) joins the federation and fails every round, its reason
left in Ray's worker logs. The check decodes through the same cache, with the same
preprocessing and seed, as the sites' workers will, so what it decodes they do not decode again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.config import RunConfig
from common.data import DataCard, DataError, check_site
from common.data.card import TASK_NEEDS
from common.training.tasks.base import preprocess


def check_site_folders(cfg: RunConfig, folders: Sequence[Path]) -> list[DataCard]:
    """The data card of each folder for `cfg`'s task; DataError naming every unusable one.

    Args:
        folders: one per site; a pooled scenario lists its one folder for every virtual site.

    """
    cards = [
        check_site(
            folder, preprocess(cfg), seed=cfg.seed, task=cfg.task,
            masks=TASK_NEEDS[cfg.task] == "masks",
            # segmentation's classes are planned from the masks' labels (common.seg_plan)
            num_classes=None if cfg.task == "segment" else cfg.num_classes,
            # a copy across splits inflates local metrics but trains: check-data reports it
            duplicates=False,
        )
        for folder in dict.fromkeys(folders)
    ]
    unusable = [(folder, card) for folder, card in zip(dict.fromkeys(folders), cards, strict=True)
                if not card.usable]
    if unusable:
        lines = [
            f"site folder {folder} is not usable for --task {cfg.task}: {'; '.join(card.reasons)}"
            for folder, card in unusable
        ]
        folder = unusable[0][0]
        raise DataError(
            f"--data {cfg.sites_dir}: {len(unusable)} of {len(cards)} site folder(s) cannot "
            "train, so nothing was started:\n  " + "\n  ".join(lines) + "\nFix each folder "
            f"(`medfed check-data {folder} --task {cfg.task} --num-classes {cfg.num_classes}` "
            "shows its whole data card) or move it out of --data."
        )
    return cards
