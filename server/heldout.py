"""The held-out images the aggregator may read: `--test-data`, else the sites' test splits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from common.config import RunConfig
from common.data import Preprocess, SiteData

log = logging.getLogger("medfed.server")


def held_out(
    cfg: RunConfig, site_dirs: Sequence[Path] = (), *, masks: bool = False
) -> list[tuple[SiteData, str]]:
    """(site data, split) pairs of the central test set; empty when there is none.

    In simulation that is the `--test-data` folder (all of it), or else every site's `test`
    split. A deployed aggregator holds no patient images; without `test-data` it relies on
    federated evaluation.
    """
    pre = Preprocess(image_size=cfg.image_size, channels=cfg.channels)
    if cfg.test_data:
        folder = Path(cfg.test_data)
        if not (folder / "labels.csv").is_file():
            raise FileNotFoundError(
                f"--test-data {folder}: no labels.csv there; pass a folder in the site "
                "layout (e.g. the `test/` folder that `medfed synth` writes)"
            )
        return [(SiteData(folder, pre, seed=cfg.seed, masks=masks), "all")]
    if site_dirs:
        # virtual sites cut out of one pool all name the pool: read its test split once
        unique = dict.fromkeys(Path(d).resolve() for d in site_dirs)
        return [(SiteData(d, pre, seed=cfg.seed, masks=masks), "test") for d in unique]
    log.warning("no --test-data: central evaluation is off, federated evaluation only")
    return []
