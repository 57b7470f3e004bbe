"""`medfed provision`: the CA, aggregator certificate, hospital keys, operator certs, as kits.

The kits' layout is described in common.kit.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509

from common.atomic import write_bytes
from common.certs import (
    Authority,
    SiteKeyPair,
    cert_pem,
    crl_pem,
    fingerprint,
    generate_operator_key,
    load_crl,
    tls_key_pem,
    validate_host,
    write_private,
    write_public,
)
from common.kit import (
    DEFAULT_HEALTH_PORT,
    DEFAULT_METRICS_PORT,
    DEFAULT_OPERATOR,
    DEFAULT_PORT,
    KIT_FILE,
    KitError,
    SiteKit,
    write_toml,
)
from common.kit_edits import distrust_operator, trust_operator
from common.operator_kit import OperatorKit
from common.outputs import note, prepare
from common.runsign import load_private_key, public_pem
from common.server_kit import OPERATORS_CRL, AuthorisedSite, IssuedOperator, ServerKit
from common.sites import is_safe_site_name, site_name_problem

PARTS = ("ca", "server", "sites", "operator", "operators")


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
        why = site_name_problem(name)
        if why:
            raise ValueError(
                f"--sites: {name!r} is not a valid site name: it {why} (it appears in results, "
                "metrics and file names)"
            )
    duplicates = sorted({n for n in clean if clean.count(n) > 1})
    if duplicates:
        raise ValueError(f"--sites: {', '.join(duplicates)} given more than once")
    return clean


def _operator_name(name: str, flag: str) -> str:
    name = name.strip()
    if not is_safe_site_name(name):
        raise ValueError(
            f"{flag}: {name!r} is not a valid operator name (1-64 letters, digits, '.', '_' or "
            "'-'; it is the certificate's CN and appears in logs)"
        )
    return name


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
    operator: str = DEFAULT_OPERATOR,
) -> ProvisionSummary:
    """Write a new federation's kits under `kits`; refuses to overwrite unless `force`.

    The first operator's kit (KITS/operator) holds a client certificate named `operator`;
    `add-operator` issues more.

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
    operator = _operator_name(operator, "--operator")
    existing = [kits / p for p in PARTS if (kits / p).exists()]
    if existing and not force:
        raise FileExistsError(
            f"{kits} already holds kits ({', '.join(p.name for p in existing)}); pass --force to "
            "re-issue everything (every site then needs its new kit), or use "
            "`medfed provision add-site NAME --kits KITS` to add one hospital"
        )
    if existing:  # --force: only the kit folders medfed wrote go (common.outputs)
        prepare(kits, force=True, writes=PARTS,
                legacy=lambda folder: (folder / "ca" / "ca.key").is_file())
    kits.mkdir(parents=True, exist_ok=True)
    note(kits, *PARTS)

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

    write_public(server_dir / OPERATORS_CRL, crl_pem(ca.revocation_list([])))

    operator_dir = kits / "operator"
    first = _write_operator_kit(ca, operator_dir, project, operator, control)
    server = replace(server, operators=(first,))
    write_toml(server_dir / KIT_FILE, server.to_toml())
    for public in _operator_public_keys(kits):
        for name in names:  # each hospital trusts the first operator's signed runs
            trust_operator(kits / "sites" / name, *public)
    return ProvisionSummary(
        kits, server_dir, operator_dir, {n: kits / "sites" / n for n in names}, fleet, control
    )


def _write_operator_kit(
    ca: Authority, kit_dir: Path, project: str, name: str, control: str
) -> IssuedOperator:
    """An operator's kit: CA, client certificate and key (0600), the Control API address."""
    _private_dir(kit_dir)
    key = generate_operator_key()
    cert = ca.issue_operator_cert(name, key.public_key())
    write_public(kit_dir / "ca.crt", cert_pem(ca.cert))
    write_private(kit_dir / "operator.key", tls_key_pem(key))
    write_public(kit_dir / "operator.crt", cert_pem(cert))
    # what a hospital passes to `medfed site trust-operator` to accept this operator's runs
    write_public(kit_dir / "operator.pub", public_pem(key.public_key()).encode())
    write_toml(kit_dir / KIT_FILE, OperatorKit(kit_dir, project, control, name).to_toml())
    not_after = cert.not_valid_after_utc.isoformat(timespec="seconds")
    return IssuedOperator(name, cert.serial_number, not_after)


def _authority(kits: Path, command: str) -> Authority:
    key, cert = kits / "ca" / "ca.key", kits / "ca" / "ca.crt"
    if not key.is_file() or not cert.is_file():
        raise KitError(
            f"{kits}/ca/ca.key or ca.crt is missing; {command} signs with the project CA: run it "
            "where the CA key is kept (pass that folder as --kits)"
        )
    return Authority.load(key, cert)


def _control_address(kits: Path) -> str:
    """The Control API address the existing operator kits name."""
    others = sorted((kits / "operators").glob(f"*/{KIT_FILE}"))
    for kit_file in [kits / "operator" / KIT_FILE, *others]:
        if kit_file.is_file():
            address = str(tomllib.loads(kit_file.read_text()).get("superlink", ""))
            if address:
                return address
    raise KitError(
        f"{kits}: no operator kit to take the Control API address from (KITS/operator is "
        "missing); re-provision"
    )


def _write_crl(server: ServerKit, crl: x509.CertificateRevocationList) -> None:
    # atomically: the running gateway reloads the file as soon as it changes
    write_bytes(server.operators_crl, crl_pem(crl), permissions=0o644)


def _revoked_serials(server: ServerKit) -> list[tuple[int, dt.datetime]]:
    if not server.operators_crl.is_file():
        return []
    crl = load_crl(server.operators_crl, server.ca_cert)
    return [(r.serial_number, r.revocation_date_utc) for r in crl]


def add_operator(kits: Path, name: str) -> tuple[Path, str]:
    """Issue one more operator's kit (KITS/operators/NAME); returns it and its Control address."""
    name = _operator_name(name, "add-operator")
    server = _server_kit_for_operators(kits)
    if any(o.name == name for o in server.operators):
        raise FileExistsError(
            f"operator {name!r} already holds a valid certificate; revoke it first "
            f"(`medfed provision revoke-operator {name} --kits {kits}`) to re-issue it"
        )
    ca = _authority(kits, "add-operator")
    control = _control_address(kits)
    kit_dir = kits / "operators" / name
    if kit_dir.exists():
        shutil.rmtree(kit_dir)
    issued = _write_operator_kit(ca, kit_dir, server.project, name, control)
    if not server.operators_crl.is_file():  # a kit from before operator certificates
        _write_crl(server, ca.revocation_list([]))
    updated = replace(server, operators=(*server.operators, issued))
    write_toml(server.path / KIT_FILE, updated.to_toml())
    # the site kits kept here trust the new operator; deployed hospitals run
    # `medfed site trust-operator` with its operator.pub
    key = load_private_key((kit_dir / "operator.key").read_bytes(), where=str(kit_dir))
    public = public_pem(key.public_key())
    for site_kit in _site_kits(kits):
        trust_operator(site_kit, name, public)
    return kit_dir, control


def revoke_operator(kits: Path, name: str) -> None:
    """Revoke an operator's certificate: it joins operators.crl; its kit's key is deleted."""
    server = _server_kit_for_operators(kits)
    entry = next((o for o in server.operators if o.name == name), None)
    if entry is None:
        known = ", ".join(o.name for o in server.operators) or "none"
        raise ValueError(
            f"revoke-operator: no operator {name!r} holds a valid certificate (valid: {known})"
        )
    ca = _authority(kits, "revoke-operator")
    revoked = [*_revoked_serials(server), (entry.serial, dt.datetime.now(dt.UTC))]
    _write_crl(server, ca.revocation_list(revoked))
    remaining = tuple(o for o in server.operators if o.name != name)
    write_toml(server.path / KIT_FILE, replace(server, operators=remaining).to_toml())
    # the site kits kept here stop trusting its runs; deployed hospitals run
    # `medfed site distrust-operator`
    for site_kit in _site_kits(kits):
        if any(o.name == name for o in SiteKit.load(site_kit, check_permissions=False).operators):
            distrust_operator(site_kit, name)
    # the revoked key is useless now; leave no copy of it in KITS
    for kit_dir in (kits / "operators" / name, kits / "operator"):
        kit_file = kit_dir / KIT_FILE
        if kit_file.is_file() and tomllib.loads(kit_file.read_text()).get(
            "name", DEFAULT_OPERATOR
        ) == name:
            for secret in ("operator.key", "operator.crt"):
                (kit_dir / secret).unlink(missing_ok=True)


def _server_kit_for_operators(kits: Path) -> ServerKit:
    server_dir = kits / "server"
    if not (server_dir / KIT_FILE).is_file():
        raise KitError(
            f"{kits}: no server kit at {server_dir}; pass the folder `medfed provision --out` "
            "wrote (--kits KITS)"
        )
    # a kit from before operator certificates has no CRL yet: add-operator writes one
    return ServerKit.load(server_dir, require_crl=False)


def _operator_public_keys(kits: Path) -> list[tuple[str, str]]:
    """Each operator kit's name and public key (KITS/operator, KITS/operators/*) to trust."""
    found = []
    others = sorted((kits / "operators").glob(f"*/{KIT_FILE}"))
    for kit_file in [kits / "operator" / KIT_FILE, *others]:
        if not kit_file.is_file():
            continue
        operator = OperatorKit.load(kit_file.parent, check_permissions=False)
        if operator.key.is_file():  # a revoked operator's key is deleted
            key = load_private_key(operator.key.read_bytes(), where=str(operator.key))
            found.append((operator.name, public_pem(key.public_key())))
    return found


def _site_kits(kits: Path) -> list[Path]:
    return sorted(p.parent for p in (kits / "sites").glob(f"*/{KIT_FILE}"))


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
    for operator in _operator_public_keys(kits):
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
