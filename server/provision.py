"""`medfed provision`: a CA, the aggregator's TLS certificate and a key per hospital, as kits.

The kits' layout is described in common.kit.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from common.certs import (
    Authority,
    SiteKeyPair,
    cert_pem,
    fingerprint,
    tls_key_pem,
    validate_host,
    write_private,
    write_public,
)
from common.kit import (
    DEFAULT_HEALTH_PORT,
    DEFAULT_METRICS_PORT,
    DEFAULT_PORT,
    KIT_FILE,
    AuthorisedSite,
    KitError,
    OperatorKit,
    ServerKit,
    SiteKit,
    trust_operator,
    write_toml,
)
from common.runsign import load_private_key, new_operator_key, public_pem
from common.sites import is_safe_site_name

PARTS = ("ca", "server", "sites", "operator")


@dataclass(frozen=True)
class ProvisionSummary:
    """What was written where, for the command to print."""

    kits: Path
    server: Path
    operator: Path
    sites: dict[str, Path]
    fleet: str
    control: str


def _site_names(names: Sequence[str]) -> list[str]:
    clean = [n.strip() for n in names if n.strip()]
    for name in clean:
        if not is_safe_site_name(name):
            raise ValueError(
                f"--sites: {name!r} is not a valid site name (1-64 letters, digits, '.', '_' "
                "or '-'; it appears in results and metrics)"
            )
    duplicates = sorted({n for n in clean if clean.count(n) > 1})
    if duplicates:
        raise ValueError(f"--sites: {', '.join(duplicates)} given more than once")
    return clean


def _address(value: str, flag: str) -> str:
    host, _, port = value.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag} {value!r} must be HOST:PORT, e.g. fl.example.org:443")
    validate_host(host.strip("[]"))
    return value.strip()


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _write_site_kit(kits: Path, project: str, site: str, superlink: str) -> AuthorisedSite:
    kit_dir = _private_dir(kits / "sites" / site)
    pair = SiteKeyPair.generate(site)
    write_public(kit_dir / "ca.crt", (kits / "ca" / "ca.crt").read_bytes())
    write_private(kit_dir / "site.key", pair.private_openssh)
    write_public(kit_dir / "site.pub", (pair.public_openssh + "\n").encode())
    write_toml(kit_dir / KIT_FILE, SiteKit(kit_dir, project, site, superlink).to_toml())
    return AuthorisedSite(site, pair.public_openssh)


def provision(
    kits: Path,
    *,
    project: str,
    server_hosts: Sequence[str],
    sites: Sequence[str],
    port: int = DEFAULT_PORT,
    fleet_address: str = "",
    control_address: str = "",
    force: bool = False,
) -> ProvisionSummary:
    """Write a new federation's kits under `kits`; refuses to overwrite unless `force`.

    Sites connect to `fleet_address` and operators to `control_address` (HOST:PORT; both
    default to the first server host and `port`, where the SuperLink listens). They differ
    behind an ingress that exposes the Fleet and Control APIs on separate host names; their
    hosts join the certificate's names.
    """
    if not project.strip():
        raise ValueError("--project must not be empty")
    hosts = [validate_host(h) for h in server_hosts if h.strip()]
    if not hosts:
        raise ValueError("--server-host: give the aggregator's host name or IP address")
    fleet = _address(fleet_address, "--fleet-address") if fleet_address else f"{hosts[0]}:{port}"
    control = _address(control_address, "--control-address") if control_address else fleet
    for address in (fleet, control):
        host = address.rpartition(":")[0].strip("[]")
        if host not in hosts:
            hosts.append(host)
    names = _site_names(sites)
    existing = [kits / p for p in PARTS if (kits / p).exists()]
    if existing and not force:
        raise FileExistsError(
            f"{kits} already holds kits ({', '.join(p.name for p in existing)}); pass --force to "
            "re-issue everything (every site then needs its new kit), or use "
            "`medfed provision add-site NAME --kits KITS` to add one hospital"
        )
    for part in existing:
        shutil.rmtree(part)
    kits.mkdir(parents=True, exist_ok=True)

    ca = Authority.create(project)
    ca_dir = _private_dir(kits / "ca")
    write_private(ca_dir / "ca.key", tls_key_pem(ca.key))
    write_public(ca_dir / "ca.crt", cert_pem(ca.cert))

    authorised = [_write_site_kit(kits, project, name, fleet) for name in names]

    server_dir = _private_dir(kits / "server")
    key, cert = ca.issue_server_cert(hosts)
    write_public(server_dir / "ca.crt", cert_pem(ca.cert))
    write_public(server_dir / "server.crt", cert_pem(cert))
    write_private(server_dir / "server.key", tls_key_pem(key))
    server = ServerKit(
        path=server_dir, project=project, hosts=tuple(hosts), port=port,
        health_port=DEFAULT_HEALTH_PORT, metrics_port=DEFAULT_METRICS_PORT,
        sites=tuple(authorised),
    )
    write_toml(server_dir / KIT_FILE, server.to_toml())

    operator_dir = kits / "operator"
    operator_dir.mkdir(parents=True, exist_ok=True)
    write_public(operator_dir / "ca.crt", cert_pem(ca.cert))
    write_toml(operator_dir / KIT_FILE, OperatorKit(operator_dir, project, control).to_toml())
    operator_key = _operator_key(operator_dir)
    for name in names:  # each hospital trusts the first operator's signed runs
        trust_operator(kits / "sites" / name, OperatorKit.load(operator_dir).name, operator_key)
    return ProvisionSummary(
        kits, server_dir, operator_dir, {n: kits / "sites" / n for n in names}, fleet, control
    )


def _operator_key(kit_dir: Path) -> str:
    """Write the operator's run-signing key (operator.key, 0600; operator.pub); its public PEM."""
    private, public = new_operator_key()
    os.chmod(kit_dir, 0o700)  # it now holds a private key
    write_private(kit_dir / "operator.key", private)
    write_public(kit_dir / "operator.pub", public.encode())
    return public


def _operator_public_key(kits: Path) -> tuple[str, str] | None:
    """The operator kit's name and public key, to trust in a new site kit; None without one."""
    if not (kits / "operator" / KIT_FILE).is_file():
        return None
    operator = OperatorKit.load(kits / "operator")
    if not operator.key.is_file():
        return None
    key = load_private_key(operator.key.read_bytes(), where=str(operator.key))
    return operator.name, public_pem(key.public_key())


def _server_kit(kits: Path) -> ServerKit:
    server_dir = kits / "server"
    if not (server_dir / KIT_FILE).is_file():
        raise KitError(
            f"{kits}: no server kit at {server_dir}; pass the folder `medfed provision --out` "
            "wrote (--kits KITS)"
        )
    return ServerKit.load(server_dir)


def add_site(kits: Path, name: str) -> tuple[Path, str]:
    """Issue one more hospital's kit and authorise it in the server kit; nothing else changes.

    Returns the new kit's folder and the aggregator address it points at.
    """
    names = _site_names([name])
    if not names:
        raise ValueError("add-site: give the new site's name")
    name = names[0]
    server = _server_kit(kits)
    if any(s.name == name for s in server.sites):
        raise FileExistsError(
            f"site {name!r} is already provisioned; revoke it first "
            f"(`medfed provision revoke-site {name} --kits {kits}`) to re-issue its key"
        )
    if not (kits / "ca" / "ca.crt").is_file():
        raise KitError(f"{kits}/ca/ca.crt is missing; add-site needs the project CA certificate")
    existing = sorted((kits / "sites").glob(f"*/{KIT_FILE}"))
    superlink = (
        SiteKit.load(existing[0].parent, check_permissions=False).superlink
        if existing
        else OperatorKit.load(kits / "operator").superlink
    )
    site = _write_site_kit(kits, server.project, name, superlink)
    operator = _operator_public_key(kits)
    if operator is not None:
        trust_operator(kits / "sites" / name, *operator)
    revoked = {k: v for k, v in server.revoked.items() if k != name}
    updated = replace(server, sites=(*server.sites, site), revoked=revoked)
    write_toml(server.path / KIT_FILE, updated.to_toml())
    return kits / "sites" / name, superlink


def revoke_site(kits: Path, name: str) -> None:
    """Withdraw a hospital's authorisation and delete its kit; the server unregisters it."""
    server = _server_kit(kits)
    entry = next((s for s in server.sites if s.name == name), None)
    if entry is None:
        known = ", ".join(s.name for s in server.sites) or "none"
        raise ValueError(f"revoke-site: no provisioned site {name!r} (provisioned: {known})")
    revoked = dict(server.revoked)
    revoked[name] = {
        "fingerprint": fingerprint(entry.public_key),
        "revoked-at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    updated = replace(
        server, sites=tuple(s for s in server.sites if s.name != name), revoked=revoked
    )
    write_toml(server.path / KIT_FILE, updated.to_toml())
    shutil.rmtree(kits / "sites" / name, ignore_errors=True)
