"""A simulation scenario: a TOML file describing the federation, parsed once into frozen objects.

`Scenario.load(path)` returns the run's `RunConfig` (the `[run]` table, plus `data.test`) and a
`Federation`: where the sites' data comes from, what goes wrong, and what each site may use.
Every key is documented in simulations/scenarios/README.md; an unknown key or a bad value is a
`ConfigError` naming the key (`faults.dropout must be ...`) and, where one exists, the fix.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from common.config import ConfigError, RunConfig
from simulations.faults import MISBEHAVIOURS, FaultSpec
from simulations.partition import PARTITIONS
from simulations.shift import ScannerShift

SCENARIO_FILE = "scenario.json"  # the run's federation, kept in RUN_DIR so --resume finds it

# Every table and its keys; anything else in a scenario file is a typo and is refused.
_TOP = {"name", "description", "sites", "data", "run", "faults", "misbehave", "resources"}
_DATA = {"path", "test", "partition", "alpha", "scanner_shift"}
_SHIFT = {"intensity", "contrast", "noise"}
_FAULTS = {"dropout", "straggler", "straggler_delay"}
_MISBEHAVE = {"fraction", "sites", "kinds", "scale", "sign_flip"}
_RESOURCES = {"cpus", "gpus", "ray"}
# set by [data] (or the simulator), not in [run]
_RUN_ELSEWHERE = {"sites_dir": "data.path", "test_data": "data.test", "run_key": None}


@dataclass(frozen=True)
class DataSpec:
    """Where the sites' images are.

    path: a folder of site folders (one site per folder), or, with `partition`, ONE folder with
        a labels.csv whose train and val splits are shared out among `Federation.sites` virtual
        sites (its test split is the central test set unless `data.test` is given).
    """

    path: str = ""
    partition: str = ""  # "" (folders) or one of simulations.partition.PARTITIONS
    alpha: float = 0.5
    scanner_shift: ScannerShift = field(default_factory=ScannerShift)

    @property
    def pooled(self) -> bool:
        """Whether the sites are cut out of one folder."""
        return bool(self.partition)


@dataclass(frozen=True)
class Resources:
    """What each virtual site may use, and which Ray to run on."""

    cpus: float = 1.0
    gpus: float | None = None  # None: 0.25 of a GPU when the run uses one, else 0
    # Ray's init_args (e.g. address = "auto" to attach to a running cluster)
    ray: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Federation:
    """Everything about a simulated federation that is not a RunConfig setting."""

    sites: int | None = None  # virtual sites (pooled data); None: one per folder
    data: DataSpec = field(default_factory=DataSpec)
    faults: FaultSpec = field(default_factory=FaultSpec)
    resources: Resources = field(default_factory=Resources)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (RUN_DIR/scenario.json)."""
        return {
            "sites": self.sites,
            "data": {
                "path": self.data.path, "partition": self.data.partition,
                "alpha": self.data.alpha,
                "scanner_shift": {k: getattr(self.data.scanner_shift, k) for k in _SHIFT},
            },
            "faults": {
                **{f.name: getattr(self.faults, f.name) for f in fields(self.faults)},
                "misbehave_sites": dict(self.faults.misbehave_sites),
                "kinds": list(self.faults.kinds),
            },
            "resources": {
                "cpus": self.resources.cpus, "gpus": self.resources.gpus,
                "ray": dict(self.resources.ray),
            },
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Federation:
        """Inverse of `to_dict`."""
        data = dict(raw["data"])
        shift = ScannerShift(**data.pop("scanner_shift"))
        faults = dict(raw["faults"])
        faults["kinds"] = tuple(faults["kinds"])
        return cls(
            sites=raw["sites"], data=DataSpec(**data, scanner_shift=shift),
            faults=FaultSpec(**faults), resources=Resources(**raw["resources"]),
        )

    def save(self, run_dir: Path) -> None:
        """Keep the federation with the run, so that `--resume RUN_DIR` rebuilds the same one."""
        (run_dir / SCENARIO_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def saved(cls, run_dir: Path) -> Federation | None:
        """The federation a run was started with, or None (a plain folder-of-sites run)."""
        path = run_dir / SCENARIO_FILE
        return cls.from_dict(json.loads(path.read_text())) if path.is_file() else None


@dataclass(frozen=True)
class Scenario:
    """A parsed scenario file: the run's settings and its federation."""

    name: str
    run: dict[str, Any]  # RunConfig settings the file gives (kebab-case), flags still to apply
    federation: Federation

    @classmethod
    def load(cls, path: Path) -> Scenario:
        """Parse and validate scenario file `path` (errors name the file and the key)."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"--scenario {path}: no such file; see simulations/scenarios/ for examples"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        try:
            return _parse(raw, default_name=path.stem)
        except (ConfigError, ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def config(self, overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """The run's RunConfig: the file's [run] settings, then `overrides` (CLI flags) on top."""
        values = {**self.run, **{k.replace("_", "-"): v for k, v in (overrides or {}).items()}}
        values.setdefault("sites-dir", self.federation.data.path)
        try:
            return RunConfig.from_mapping(values)
        except ConfigError as exc:
            raise ConfigError(_run_key_message(str(exc))) from None


def _run_key_message(message: str) -> str:
    """"--rounds must be ..." -> "run.rounds (--rounds) must be ...": the key and the flag."""
    match = re.match(r"--([a-z0-9-]+) (.*)", message, re.S)
    if not match:
        return message
    flag, rest = match.groups()
    elsewhere = {"sites-dir": "data.path", "test-data": "data.test"}
    key = elsewhere.get(flag, "run." + flag.replace("-", "_"))
    return f"{key} (--{flag}) {rest}"


def _table(raw: Mapping[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
    value = raw.get(key.rsplit(".", 1)[-1], {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table, got {value!r}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key {key}.{unknown[0]}; [{key}] takes {', '.join(sorted(allowed))}"
        )
    return dict(value)


def _number(table: Mapping[str, Any], key: str, name: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name}.{key} must be a number, got {value!r}")
    return float(value)


def _parse(raw: Mapping[str, Any], *, default_name: str) -> Scenario:
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r}; a scenario takes {', '.join(sorted(_TOP))} "
            "(see simulations/scenarios/README.md)"
        )
    data = _table(raw, "data", _DATA)
    shift = _table(data, "data.scanner_shift", _SHIFT)
    faults = _table(raw, "faults", _FAULTS)
    misbehave = _table(raw, "misbehave", _MISBEHAVE)
    resources = _table(raw, "resources", _RESOURCES)
    run = raw.get("run", {})
    if not isinstance(run, dict):
        raise ConfigError(f"[run] must be a table, got {run!r}")

    sites = raw.get("sites")
    if sites is not None and (isinstance(sites, bool) or not isinstance(sites, int) or sites < 1):
        raise ConfigError(f"sites must be a whole number >= 1, got {sites!r}")
    partition = str(data.get("partition", ""))
    if partition and partition not in PARTITIONS:
        raise ConfigError(
            f"data.partition must be one of {', '.join(PARTITIONS)}, got {partition!r}"
        )
    if partition and sites is None:
        raise ConfigError(
            f"sites is required with data.partition = {partition!r}: how many virtual sites "
            "to cut the folder into (e.g. sites = 20)"
        )
    if not partition and "alpha" in data:
        raise ConfigError(
            "data.alpha needs data.partition (dirichlet or quantity); without a partition "
            "every folder under data.path is one site"
        )
    alpha = _number(data, "alpha", "data", 0.5)
    if not alpha > 0:
        raise ConfigError(f"data.alpha must be > 0 (small: more skew, e.g. 0.3), got {alpha:g}")

    run_values: dict[str, Any] = {}
    for key, value in run.items():
        snake = key.replace("-", "_")
        if snake in _RUN_ELSEWHERE:
            where = _RUN_ELSEWHERE[snake]
            raise ConfigError(
                f"run.{key} is not set in [run]"
                + (f"; use {where}" if where else "; the simulator chooses it")
            )
        run_values[snake.replace("_", "-")] = value
    if "path" in data:
        run_values["sites-dir"] = str(data["path"])
    if "test" in data:
        run_values["test-data"] = str(data["test"])

    kinds = misbehave.get("kinds", ["scale", "sign_flip"])
    if isinstance(kinds, str):
        kinds = [kinds]
    if not isinstance(kinds, list) or not kinds or any(k not in MISBEHAVIOURS for k in kinds):
        raise ConfigError(
            f"misbehave.kinds must be a list of {', '.join(MISBEHAVIOURS)}, got {kinds!r}"
        )
    named = misbehave.get("sites", {})
    if isinstance(named, list):  # a list of names: kinds handed out in turn
        named = {str(name): kinds[i % len(kinds)] for i, name in enumerate(named)}
    if not isinstance(named, dict):
        raise ConfigError(
            'misbehave.sites must be a list of site names or a table {"site-0003" = "nan"}, '
            f"got {named!r}"
        )
    ray = resources.get("ray", {})
    if not isinstance(ray, dict):
        raise ConfigError(
            f'resources.ray must be a table (e.g. {{ address = "auto" }}), got {ray!r}'
        )
    gpus = resources.get("gpus")
    try:
        federation = Federation(
            sites=sites,
            data=DataSpec(
                path=str(data.get("path", "")), partition=partition, alpha=alpha,
                scanner_shift=ScannerShift(
                    intensity=_number(shift, "intensity", "data.scanner_shift", 0.0),
                    contrast=_number(shift, "contrast", "data.scanner_shift", 0.0),
                    noise=_number(shift, "noise", "data.scanner_shift", 0.0),
                ),
            ),
            faults=FaultSpec(
                dropout=_number(faults, "dropout", "faults", 0.0),
                straggler=_number(faults, "straggler", "faults", 0.0),
                straggler_delay=_number(faults, "straggler_delay", "faults", 0.0),
                misbehave_fraction=_number(misbehave, "fraction", "misbehave", 0.0),
                misbehave_sites={str(k): str(v) for k, v in named.items()},
                kinds=tuple(str(k) for k in kinds),
                scale=_number(misbehave, "scale", "misbehave", 10.0),
                sign_flip=_number(misbehave, "sign_flip", "misbehave", 4.0),
            ),
            resources=Resources(
                cpus=_number(resources, "cpus", "resources", 1.0),
                gpus=None if gpus is None else _number(resources, "gpus", "resources", 0.0),
                ray=dict(ray),
            ),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not federation.resources.cpus > 0:
        raise ConfigError(f"resources.cpus must be > 0 (e.g. 1), got {federation.resources.cpus:g}")
    if federation.resources.gpus is not None and not 0 <= federation.resources.gpus <= 1:
        raise ConfigError(
            "resources.gpus must be a share of one GPU in [0, 1], got "
            f"{federation.resources.gpus:g}"
        )
    scenario = Scenario(
        name=str(raw.get("name", default_name)), run=run_values, federation=federation
    )
    scenario.config()  # validate the [run] settings now, with the keys named as in the file
    return scenario
