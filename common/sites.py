"""Where a site's images and its own state (privacy ledger) live."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def is_safe_site_name(name: str) -> bool:
    """1-64 letters, digits, '.', '_' or '-': fit for results, logs and metric labels."""
    return bool(_SAFE_NAME.match(name))


@dataclass(frozen=True)
class SiteRef:
    """A hospital site: its name (the only thing about it the aggregator sees), data and state."""

    name: str
    data_dir: Path
    state_dir: Path
    # a part of `data_dir` that is this site's own dataset (a simulation's virtual site cut
    # out of one pooled folder); empty: the whole folder
    subset: str = ""

    def __post_init__(self) -> None:
        if not is_safe_site_name(self.name):
            raise ValueError(
                f"site name {self.name!r} must be 1-64 letters, digits, '.', '_' or '-' "
                "(it is sent to the aggregator and used in metrics); rename the folder"
            )


def discover_sites(sites_dir: Path) -> list[Path]:
    """Every folder directly under `sites_dir` that holds a labels.csv, sorted by name."""
    if not sites_dir.is_dir():
        raise FileNotFoundError(
            f"{sites_dir}: no such folder; pass the folder that holds one sub-folder per site "
            "(e.g. the `sites/` folder that `medfed synth` writes)"
        )
    found = sorted(p for p in sites_dir.iterdir() if p.is_dir() and (p / "labels.csv").is_file())
    if not found:
        raise FileNotFoundError(
            f"{sites_dir}: no site folders found (a site folder holds a labels.csv); "
            "create one with `medfed synth --sites 4 --out data/demo`"
        )
    return found


def site_refs(sites_dir: Path, state_root: Path) -> list[SiteRef]:
    """SiteRefs for every site under `sites_dir`, each keeping its state in `state_root/<name>`."""
    return [SiteRef(p.name, p, state_root / p.name) for p in discover_sites(sites_dir)]
