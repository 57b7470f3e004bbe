"""Where a site's images and its own state (privacy ledger) live."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SITE_NAME_RULE = (
    "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit (no spaces, paths "
    "or separators), and nothing that looks like a patient identifier"
)
# What a patient identifier tends to look like inside a name: a long number (a medical record,
# accession or social security number, a date of birth) or its label. A person's name alone
# cannot be told from a hospital's ("Jensen_Hugo" vs "St_Marys"); the DICOM person-name
# separator '^' and spaces are refused by the character rule.
_DIGIT_RUN = re.compile(r"\d{6,}")
_IDENTIFIER_WORDS = frozenset(
    {"mrn", "ssn", "dob", "pid", "patient", "patientid", "accession", "birthdate"}
)
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")  # "JensenHugoMRN" -> Jensen, Hugo, MRN


def identifier_problem(value: str) -> str | None:
    """Why `value` looks like a patient identifier, or None.

    A heuristic, for names and short strings that leave a site: it refuses runs of 6 or more
    digits and the usual labels of identifiers (MRN, SSN, DOB, patient ...), as words.
    """
    run = _DIGIT_RUN.search(value)
    if run:
        return (
            f"holds the number {run.group()!r} (6 or more digits: a record number, accession "
            "number or date of birth?)"
        )
    words = {w.lower() for w in _WORDS.findall(value)}
    labels = sorted(words & _IDENTIFIER_WORDS)
    if labels:
        return f"holds {labels[0]!r}, the label of a patient identifier"
    return None


def site_name_problem(name: str) -> str | None:
    """Why `name` cannot be a site name (it is sent to the aggregator and names files), or None."""
    if not _SAFE_NAME.match(name):
        return f"must be {SITE_NAME_RULE}"
    why = identifier_problem(name)
    return f"looks like a patient identifier: it {why}" if why else None


def is_safe_site_name(name: str) -> bool:
    """Whether `name` is fit for results, logs, metric labels and file names (SITE_NAME_RULE)."""
    return site_name_problem(name) is None


def check_site_name(name: str, *, where: str) -> str:
    """`name` if it is a valid site name; else ValueError naming `where` (a flag or file)."""
    why = site_name_problem(name)
    if why:
        raise ValueError(f"{where}: site name {name!r} {why}; choose a name such as 'st-marys'")
    return name


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
        why = site_name_problem(self.name)
        if why:
            raise ValueError(
                f"site name {self.name!r} {why} (it is sent to the aggregator and used in "
                "metrics); rename the site folder, or set another --node-config site-name"
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
