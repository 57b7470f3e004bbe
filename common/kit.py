"""Startup kits: what each party of a federation holds, as `medfed provision` writes them.

    KITS/
      ca/ca.key, ca/ca.crt            the project CA (keep ca.key offline; it signs server certs)
      server/   medfed-kit.toml ca.crt server.crt server.key operators.crl
      sites/<name>/ medfed-kit.toml ca.crt site.key site.pub
      operator/ medfed-kit.toml ca.crt operator.crt operator.key operator.pub (the first operator)
      operators/<name>/ (the same)                                   (`add-operator NAME`)

Every kit folder is flat, so it maps one-to-one onto a Kubernetes Secret
(`kubectl create secret generic NAME --from-file=KITS/server/`). The server kit's
`medfed-kit.toml` lists every authorised site with its public key: adding or revoking a
hospital changes that one file, and a running `medfed server` picks the change up.
It also lists the operators holding a valid certificate (`[operators.NAME]`, with its serial);
`operators.crl` is the CA's list of revoked operator certificates, which the server's gateway
applies within seconds of a change. A private key is never written into another party's kit.

A site kit's `[[apps.approved]]` entries are the app versions (FAB SHA-256 hashes) the hospital
approved; the hospital edits them (`medfed site approve`, `revoke-app`), and a site runs no
other app. An empty list approves nothing.

A site kit's `[policy]` is the runs the hospital agrees to train (common.policy; DP required by
default) and its `[[operators]]` the operators whose signed runs it accepts (name and public
key, common.runsign): the site refuses any run that is unsigned, signed by another key, or
outside its policy. The operator kit's `operator.key` signs runs.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.apps import check_fab_hash
from common.config import ConfigError, check_budget
from common.policy import PolicyError, RunPolicy
from common.runsign import RunSignatureError
from common.runsign import load_public_key as load_operator_key
from common.sites import is_safe_site_name, site_name_problem

KIT_FILE = "medfed-kit.toml"
KIT_VERSION = 1
DEFAULT_PORT = 9092  # the SuperLink's one HTTPS port: Fleet, Control and Runtime APIs
DEFAULT_HEALTH_PORT = 9098
DEFAULT_METRICS_PORT = 9400


class KitError(ValueError):
    """A kit is missing, incomplete, of the wrong kind, or unsafe; the message says the fix."""


def read_kit(kit_dir: Path) -> dict[str, Any]:
    """A kit folder's medfed-kit.toml, parsed; KitError names the folder and the fix."""
    path = kit_dir / KIT_FILE
    if not kit_dir.is_dir():
        raise KitError(
            f"{kit_dir}: no such kit folder; pass the folder `medfed provision` wrote "
            "(e.g. KITS/server, KITS/sites/<name> or KITS/operator)"
        )
    if not path.is_file():
        raise KitError(
            f"{kit_dir}: not a medfed kit (no {KIT_FILE}); pass the folder `medfed provision` "
            "wrote, not its parent"
        )
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise KitError(f"{path}: not valid TOML ({exc}); re-issue the kit") from None


def write_toml(path: Path, values: dict[str, Any]) -> None:
    """Write a kit file (public: it holds no secret)."""
    path.write_text(tomli_w.dumps(values))
    os.chmod(path, 0o644)


def check_kind(values: dict[str, Any], kit_dir: Path, expected: str) -> None:
    """Refuse a kit of another party's kind, naming the kit this command needs."""
    kind = values.get("kind")
    if kind != expected:
        hint = {"server": "KITS/server", "site": "KITS/sites/<name>", "operator": "KITS/operator"}
        raise KitError(
            f"{kit_dir} is a {kind or 'unknown'} kit, but this command needs the {expected} kit "
            f"({hint[expected]})"
        )


def check_files(kit_dir: Path, *names: str) -> None:
    """Refuse a kit that lacks any of the files `names`."""
    missing = [n for n in names if not (kit_dir / n).is_file()]
    if missing:
        raise KitError(
            f"{kit_dir}: missing {', '.join(missing)}; the kit is incomplete, ask the federation "
            "operator for a new one (`medfed provision`)"
        )


def check_private(path: Path) -> None:
    """Refuse a private key that other users can read or anyone but its owner can write."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o022 or mode & 0o004:
        raise KitError(
            f"{path}: private key is readable or writable by other users (mode {mode:o}); "
            f"run `chmod 600 {path}`"
        )


@dataclass(frozen=True)
class ApprovedApp:
    """One app version a hospital approved: its FAB hash and what the approver noted."""

    fab_sha256: str
    app: str = ""  # publisher/name version, for people; the hash is what is checked
    note: str = ""
    approved_at: str = ""

    def to_toml(self) -> dict[str, str]:
        """The `[[apps.approved]]` entry."""
        entry = {"fab-sha256": self.fab_sha256, "app": self.app, "note": self.note,
                 "approved-at": self.approved_at}
        return {k: v for k, v in entry.items() if v}


def _approved_apps(values: dict[str, Any], kit_dir: Path) -> tuple[ApprovedApp, ...]:
    where = f"{kit_dir / KIT_FILE}: [apps] approved"
    entries = values.get("apps", {}).get("approved", [])
    if not isinstance(entries, list):
        raise KitError(f"{where} must be a list of FAB hashes or [[apps.approved]] tables")
    apps = []
    for entry in entries:
        # a plain hash string is accepted too, for hand-edited kits
        fields = {"fab-sha256": entry} if isinstance(entry, str) else entry
        if not isinstance(fields, dict):
            raise KitError(f"{where}: {entry!r} is neither a hash nor a table")
        try:
            digest = check_fab_hash(str(fields.get("fab-sha256", "")), "fab-sha256")
        except ValueError as exc:
            raise KitError(f"{where}: {exc}") from None
        apps.append(
            ApprovedApp(digest, str(fields.get("app", "")), str(fields.get("note", "")),
                        str(fields.get("approved-at", "")))
        )
    return tuple(apps)


@dataclass(frozen=True)
class TrustedOperator:
    """An operator whose signed runs a site accepts: a name and an EC P-256 public key (PEM)."""

    name: str
    public_key: str

    def __post_init__(self) -> None:
        if not is_safe_site_name(self.name):
            raise KitError(
                f"operator name {self.name!r} must be 1-64 letters, digits, '.', '_', '-'"
            )
        try:
            load_operator_key(self.public_key, where=f"operator {self.name}'s public key")
        except RunSignatureError as exc:
            raise KitError(str(exc)) from None

    def to_toml(self) -> dict[str, str]:
        """The `[[operators]]` entry."""
        return {"name": self.name, "public-key": self.public_key}


def _trusted_operators(values: dict[str, Any], kit_dir: Path) -> tuple[TrustedOperator, ...]:
    where = f"{kit_dir / KIT_FILE}: [[operators]]"
    entries = values.get("operators", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise KitError(f"{where} must be tables with name and public-key")
    try:
        operators = tuple(
            TrustedOperator(str(e.get("name", "")), str(e.get("public-key", ""))) for e in entries
        )
    except KitError as exc:
        raise KitError(f"{where}: {exc}") from None
    names = [o.name for o in operators]
    if len(set(names)) != len(names):
        raise KitError(f"{where}: an operator is listed twice; keep one entry per name")
    return operators


def _policy(values: dict[str, Any], kit_dir: Path) -> RunPolicy:
    try:
        return RunPolicy.from_toml(values.get("policy"), str(kit_dir / KIT_FILE))
    except PolicyError as exc:
        raise KitError(str(exc)) from None


@dataclass(frozen=True)
class SiteKit:
    """A hospital's kit: its authentication key, the CA, the aggregator's address."""

    path: Path
    project: str
    site: str
    superlink: str  # host:port of the Fleet API
    budget_epsilon: float | None = None  # the hospital's own, over all runs; set in the kit
    approved_apps: tuple[ApprovedApp, ...] = ()  # the hospital's own; empty approves nothing
    policy: RunPolicy = RunPolicy()  # the hospital's own: which runs it trains
    operators: tuple[TrustedOperator, ...] = ()  # whose signed runs it accepts

    def trusted_operators(self) -> dict[str, str]:
        """Operator name -> public key PEM, as common.runsign.verify_run takes them."""
        return {o.name: o.public_key for o in self.operators}

    def approves(self, fab_sha256: str) -> bool:
        """Whether the hospital approved the app bundle with this hash."""
        return any(a.fab_sha256 == fab_sha256 for a in self.approved_apps)

    @property
    def ca_cert(self) -> Path:
        """The project CA certificate."""
        return self.path / "ca.crt"

    @property
    def private_key(self) -> Path:
        """The site's SuperNode authentication key (OpenSSH)."""
        return self.path / "site.key"

    @property
    def public_key(self) -> Path:
        """The site's public key, as registered at the aggregator."""
        return self.path / "site.pub"

    @classmethod
    def load(cls, kit_dir: Path, *, check_permissions: bool = True) -> SiteKit:
        """Read and check the kit in `kit_dir`; raises KitError saying what to fix."""
        values = read_kit(kit_dir)
        check_kind(values, kit_dir, "site")
        check_files(kit_dir, "ca.crt", "site.key", "site.pub")
        if check_permissions:
            check_private(kit_dir / "site.key")
        site = str(values.get("site", ""))
        why = site_name_problem(site)
        if why:
            raise KitError(
                f"--kit {kit_dir}: site = {site!r} in {KIT_FILE} {why}; ask the operator for a "
                "kit under a valid name (`medfed provision add-site NAME`)"
            )
        budget = values.get("budget-epsilon")
        if budget is not None:
            try:
                budget = check_budget(budget, f"{kit_dir / KIT_FILE}: budget-epsilon")
            except ConfigError as exc:
                raise KitError(str(exc)) from None
        return cls(
            kit_dir, str(values.get("project", "")), site, superlink_address(values, kit_dir),
            float(budget) if budget is not None else None, _approved_apps(values, kit_dir),
            _policy(values, kit_dir), _trusted_operators(values, kit_dir),
        )

    def to_toml(self) -> dict[str, Any]:
        """The kit file's content."""
        values: dict[str, Any] = {
            "kind": "site", "version": KIT_VERSION, "project": self.project,
            "site": self.site, "superlink": self.superlink,
        }
        if self.budget_epsilon is not None:
            values["budget-epsilon"] = self.budget_epsilon
        values["apps"] = {"approved": [a.to_toml() for a in self.approved_apps]}
        values["policy"] = self.policy.to_toml()
        values["operators"] = [o.to_toml() for o in self.operators]
        return values


DEFAULT_OPERATOR = "operator"


def superlink_address(values: dict[str, Any], kit_dir: Path) -> str:
    """The kit's SuperLink address, checked to be HOST:PORT."""
    address = str(values.get("superlink", ""))
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise KitError(
            f"{kit_dir / KIT_FILE}: superlink = {address!r} must be HOST:PORT; re-issue the kit"
        )
    return address
