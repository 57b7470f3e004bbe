"""The operator kit: the certificate and signing key of one person who submits runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.kit import (
    DEFAULT_OPERATOR,
    KIT_FILE,
    KIT_VERSION,
    KitError,
    check_files,
    check_kind,
    check_private,
    read_kit,
    superlink_address,
)
from common.sites import is_safe_site_name


@dataclass(frozen=True)
class OperatorKit:
    """An operator's kit: the CA, the Control API address, a client certificate and its key.

    The aggregator serves its Control API to nobody without such a certificate.
    """

    path: Path
    project: str
    superlink: str
    name: str = DEFAULT_OPERATOR

    @property
    def ca_cert(self) -> Path:
        """The project CA certificate."""
        return self.path / "ca.crt"

    @property
    def cert(self) -> Path:
        """The operator's client certificate (CN=name, OU=medfed-operator)."""
        return self.path / "operator.crt"

    @property
    def key(self) -> Path:
        """The operator's private key (EC P-256, PKCS#8 PEM, mode 0600)."""
        return self.path / "operator.key"

    @classmethod
    def load(cls, kit_dir: Path, *, check_permissions: bool = True) -> OperatorKit:
        """Read and check the kit in `kit_dir`; raises KitError saying what to fix."""
        values = read_kit(kit_dir)
        check_kind(values, kit_dir, "operator")
        check_files(kit_dir, "ca.crt")
        name = str(values.get("name", DEFAULT_OPERATOR))
        if not is_safe_site_name(name):
            raise KitError(f"{kit_dir / KIT_FILE}: invalid operator name {name!r}; re-issue it")
        missing = [f for f in ("operator.crt", "operator.key") if not (kit_dir / f).is_file()]
        if missing:
            raise KitError(
                f"{kit_dir}: missing {', '.join(missing)}; the aggregator serves its Control API "
                "only to an operator certificate: issue one with `medfed provision add-operator "
                "NAME --kits KITS` and use the kit it writes (KITS/operators/NAME)"
            )
        if check_permissions:
            check_private(kit_dir / "operator.key")
        return cls(
            kit_dir, str(values.get("project", "")), superlink_address(values, kit_dir), name
        )

    def to_toml(self) -> dict[str, Any]:
        """The kit file's content."""
        return {
            "kind": "operator", "version": KIT_VERSION, "project": self.project,
            "name": self.name, "superlink": self.superlink,
        }
