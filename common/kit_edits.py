"""Changing a site kit in place: the hospital's own commands.

Approved apps, run policy and trusted operators, each written atomically.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import tomli_w

from common.apps import check_fab_hash
from common.atomic import write_text
from common.kit import KIT_FILE, ApprovedApp, SiteKit, TrustedOperator, read_kit
from common.policy import RunPolicy


def _replace_kit_file(kit_dir: Path, values: dict[str, Any]) -> None:
    """Write a kit's medfed-kit.toml atomically: a running site reads it at every task."""
    write_text(kit_dir / KIT_FILE, tomli_w.dumps(values), permissions=0o644)


def _rewrite_apps(kit_dir: Path, apps: tuple[ApprovedApp, ...]) -> None:
    """Replace the kit's approved apps, keeping every other line's values, atomically.

    The SuperNode's app check reads the kit at every task, so it must never see half a file.
    """
    values = read_kit(kit_dir)
    values.setdefault("apps", {})["approved"] = [a.to_toml() for a in apps]
    _replace_kit_file(kit_dir, values)


def approve_app(kit_dir: Path, fab_sha256: str, *, app: str = "", note: str = "") -> bool:
    """Add an app version to a site kit's approved apps; False when it already was."""
    digest = check_fab_hash(fab_sha256)
    kit = SiteKit.load(kit_dir, check_permissions=False)
    if kit.approves(digest):
        return False
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    _rewrite_apps(kit_dir, (*kit.approved_apps, ApprovedApp(digest, app, note, now)))
    return True


def revoke_app(kit_dir: Path, fab_sha256: str) -> ApprovedApp:
    """Remove an app version from a site kit's approved apps; the entry that was removed."""
    digest = check_fab_hash(fab_sha256)
    kit = SiteKit.load(kit_dir, check_permissions=False)
    entry = next((a for a in kit.approved_apps if a.fab_sha256 == digest), None)
    if entry is None:
        raise ValueError(
            f"--fab-hash {digest}: not approved in {kit_dir / KIT_FILE} (`medfed site apps "
            f"--kit {kit_dir}` lists what is)"
        )
    _rewrite_apps(kit_dir, tuple(a for a in kit.approved_apps if a.fab_sha256 != digest))
    return entry


def _rewrite_table(kit_dir: Path, key: str, value: Any) -> None:
    """Replace one top-level entry of a site kit, keeping every other value, atomically."""
    values = read_kit(kit_dir)
    values[key] = value
    _replace_kit_file(kit_dir, values)


def set_policy(kit_dir: Path, policy: RunPolicy) -> None:
    """Replace a site kit's run policy; the site applies it from the next message on."""
    SiteKit.load(kit_dir, check_permissions=False)  # a site kit, readable
    _rewrite_table(kit_dir, "policy", policy.to_toml())


def trust_operator(site_kit_dir: Path, name: str, public_key_pem: str) -> bool:
    """Accept runs signed by this operator at a site; False when it was trusted with this key.

    An operator already trusted under `name` with another key gets the new key (re-issued).
    """
    entry = TrustedOperator(name, public_key_pem.strip() + "\n")
    kit = SiteKit.load(site_kit_dir, check_permissions=False)
    if entry in kit.operators:
        return False
    others = [o for o in kit.operators if o.name != name]
    _rewrite_table(site_kit_dir, "operators", [o.to_toml() for o in (*others, entry)])
    return True


def distrust_operator(site_kit_dir: Path, name: str) -> TrustedOperator:
    """Stop accepting runs signed by this operator at a site; the entry that was removed."""
    kit = SiteKit.load(site_kit_dir, check_permissions=False)
    entry = next((o for o in kit.operators if o.name == name), None)
    if entry is None:
        known = ", ".join(o.name for o in kit.operators) or "none"
        raise ValueError(
            f"--name {name!r}: not a trusted operator in {site_kit_dir / KIT_FILE} "
            f"(trusted: {known})"
        )
    _rewrite_table(
        site_kit_dir, "operators", [o.to_toml() for o in kit.operators if o.name != name]
    )
    return entry
