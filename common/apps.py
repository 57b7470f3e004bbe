"""Which Flower App is this: a bundle's SHA-256, its name and version, and the refusal mark.

A site runs only the app versions its hospital approved, named by the SHA-256 of the Flower App
Bundle (FAB) the aggregator sends: what Flower itself calls the FAB hash. `flwr run` builds the
FAB deterministically from the app folder (sorted files, fixed timestamps), so the hash of a
folder can be computed anywhere with Flower's own build function and compared.

Sites (client.approval) and the aggregator (which records refusals) both use this module.
"""

from __future__ import annotations

import hashlib
import io
import re
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

from common.refusals import cut_refusal

# An app refusal carries this, so the aggregator records a refusal (policy), not an error.
APP_REFUSAL_MARK = "app not approved"

_HASH = re.compile(r"[0-9a-f]{64}")


def parse_app_refusal(reason: str) -> tuple[str, str | None] | None:
    """(the refusal text, the refusing site) from a reply's reason; None if not an app refusal."""
    return cut_refusal(reason, APP_REFUSAL_MARK)


def check_fab_hash(value: str, flag: str = "--fab-hash") -> str:
    """The hash in canonical form (64 lowercase hex digits); ValueError naming `flag` if not."""
    clean = value.strip().lower()
    if not _HASH.fullmatch(clean):
        raise ValueError(
            f"{flag} {value!r} is not a FAB hash: it must be the 64 hex digits of the app "
            "bundle's SHA-256, as `medfed run` prints it or `medfed site app-hash APP_DIR` "
            "computes it"
        )
    return clean


def fab_sha256(content: bytes) -> str:
    """The FAB hash of a bundle's bytes (Flower's `fab.hash_str` for an untampered bundle)."""
    return hashlib.sha256(content).hexdigest()


@dataclass(frozen=True)
class AppBundle:
    """A FAB: its hash and the identity its pyproject.toml declares."""

    sha256: str
    publisher: str
    name: str
    version: str

    @property
    def label(self) -> str:
        """`publisher/name version`, as people name the app."""
        return f"{self.publisher}/{self.name} {self.version}"

    @classmethod
    def from_content(cls, content: bytes) -> AppBundle:
        """Read a FAB's identity; unknown fields when it is not a readable bundle."""
        publisher = name = version = "?"
        try:
            with zipfile.ZipFile(io.BytesIO(content)) as archive:
                config = tomllib.loads(archive.read("pyproject.toml").decode())
            project = config.get("project", {})
            name = str(project.get("name", "?"))
            version = str(project.get("version", "?"))
            publisher = str(config.get("tool", {}).get("flwr", {}).get("app", {}).get(
                "publisher", "?"
            ))
        except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            pass
        return cls(fab_sha256(content), publisher, name, version)


def build_app_bundle(app_dir: Path) -> tuple[bytes, AppBundle]:
    """The FAB `flwr run APP_DIR` would submit (built by Flower's own function), and its id."""
    from flwr.cli.build import build_fab_from_disk

    if not (app_dir / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"{app_dir}: not a Flower App (no pyproject.toml); pass the app's folder"
        )
    content = build_fab_from_disk(app_dir)
    return content, AppBundle.from_content(content)
