"""The server kit: the aggregator's certificates, its authorised sites and issued operators."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.certs import load_public_key
from common.kit import (
    DEFAULT_HEALTH_PORT,
    DEFAULT_METRICS_PORT,
    DEFAULT_PORT,
    KIT_FILE,
    KIT_VERSION,
    KitError,
    check_files,
    check_kind,
    check_private,
    read_kit,
)
from common.sites import is_safe_site_name, site_name_problem


@dataclass(frozen=True)
class AuthorisedSite:
    """A hospital the server kit lets in."""

    name: str
    public_key: str  # OpenSSH line

    def __post_init__(self) -> None:
        why = site_name_problem(self.name)
        if why:
            raise KitError(f"site name {self.name!r} {why}")
        load_public_key(self.public_key, where=f"site {self.name}'s public key")


OPERATORS_CRL = "operators.crl"


@dataclass(frozen=True)
class IssuedOperator:
    """An operator whose certificate the server kit records (to revoke it by name)."""

    name: str
    serial: int
    not_after: str = ""

    def __post_init__(self) -> None:
        if not is_safe_site_name(self.name):
            raise KitError(
                f"operator name {self.name!r} must be 1-64 letters, digits, '.', '_', '-'"
            )

    def to_toml(self) -> dict[str, str]:
        """The `[operators.NAME]` entry (the serial in hex: TOML integers stop at 2**63)."""
        return {"serial": f"{self.serial:x}", "not-after": self.not_after}


def _operators(values: dict[str, Any], kit_dir: Path) -> tuple[IssuedOperator, ...]:
    entries = values.get("operators", {})
    if not isinstance(entries, dict):
        raise KitError(f"{kit_dir / KIT_FILE}: [operators] must be a table of NAME = {{serial}}")
    issued = []
    for name, entry in sorted(entries.items()):
        try:
            serial = int(str(entry.get("serial", "")), 16)
        except (AttributeError, ValueError):
            raise KitError(
                f"{kit_dir / KIT_FILE}: operators.{name}.serial must be a hex serial number; "
                "re-issue the operator (`medfed provision add-operator`)"
            ) from None
        issued.append(IssuedOperator(name, serial, str(entry.get("not-after", ""))))
    return tuple(issued)


@dataclass(frozen=True)
class ServerKit:
    """The aggregator's kit: TLS certificate and key, the CA, the authorised sites, operators."""

    path: Path
    project: str
    hosts: tuple[str, ...]
    port: int
    health_port: int
    metrics_port: int
    sites: tuple[AuthorisedSite, ...]
    revoked: dict[str, dict[str, str]] = field(default_factory=dict)
    operators: tuple[IssuedOperator, ...] = ()

    @property
    def ca_cert(self) -> Path:
        """The project CA certificate."""
        return self.path / "ca.crt"

    @property
    def cert(self) -> Path:
        """The SuperLink's TLS certificate."""
        return self.path / "server.crt"

    @property
    def key(self) -> Path:
        """The SuperLink's TLS private key."""
        return self.path / "server.key"

    @property
    def operators_crl(self) -> Path:
        """The CA's list of revoked operator certificates (PEM)."""
        return self.path / OPERATORS_CRL

    @classmethod
    def load(
        cls, kit_dir: Path, *, check_permissions: bool = True, require_crl: bool = True
    ) -> ServerKit:
        """Read and check the kit in `kit_dir`; raises KitError saying what to fix.

        `require_crl=False` reads a kit from before operator certificates (to add one).
        """
        values = read_kit(kit_dir)
        check_kind(values, kit_dir, "server")
        check_files(kit_dir, "ca.crt", "server.crt", "server.key")
        if require_crl and not (kit_dir / OPERATORS_CRL).is_file():
            raise KitError(
                f"{kit_dir}: missing {OPERATORS_CRL} (the revoked operator certificates); the "
                "kit predates operator certificates: issue one with `medfed provision "
                "add-operator NAME --kits KITS`, which writes it, and copy the server kit again"
            )
        if check_permissions:
            check_private(kit_dir / "server.key")
        link = values.get("superlink", {})
        sites = tuple(
            AuthorisedSite(name, str(entry.get("public-key", "")))
            for name, entry in sorted(values.get("sites", {}).items())
        )
        return cls(
            path=kit_dir,
            project=str(values.get("project", "")),
            hosts=tuple(link.get("hosts", ())),
            port=int(link.get("port", DEFAULT_PORT)),
            health_port=int(link.get("health-port", DEFAULT_HEALTH_PORT)),
            metrics_port=int(link.get("metrics-port", DEFAULT_METRICS_PORT)),
            sites=sites,
            revoked=dict(values.get("revoked", {})),
            operators=_operators(values, kit_dir),
        )

    def to_toml(self) -> dict[str, Any]:
        """The kit file's content."""
        return {
            "kind": "server",
            "version": KIT_VERSION,
            "project": self.project,
            "superlink": {
                "hosts": list(self.hosts),
                "port": self.port,
                "health-port": self.health_port,
                "metrics-port": self.metrics_port,
            },
            "sites": {s.name: {"public-key": s.public_key} for s in self.sites},
            "revoked": self.revoked,
            "operators": {o.name: o.to_toml() for o in self.operators},
        }
