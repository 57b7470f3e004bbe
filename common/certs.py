"""Certificates and keys of a federation: CA, SuperLink TLS, SuperNode keys, operator certs.

Flower's rules, which these follow:
- the SuperLink serves TLS with a certificate signed by a CA that every SuperNode and operator
  trusts (`--root-certificates`); its own SuperExec connects to it on 127.0.0.1, so that address
  is always among the certificate's names;
- a SuperNode authenticates with an elliptic-curve key on a NIST curve, the private key in
  OpenSSH format and the public key as an OpenSSH line (`flwr supernode register` reads it).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1()
OPERATOR_CURVE = ec.SECP256R1()  # the operator key also signs run configs (P-256, as agreed)
CA_DAYS = 10 * 365
SERVER_DAYS = 2 * 365
OPERATOR_DAYS = 365
OPERATOR_OU = "medfed-operator"
# The SuperLink's own SuperExec reaches it here, whatever the public host names are.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (0600), never briefly world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # the umask cannot widen it, but make it explicit


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate or public key (0644)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o644)


def san_entry(host: str) -> x509.GeneralName:
    """An IP address SAN for an address, a DNS SAN otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def validate_host(host: str) -> str:
    """A host name or IP address fit for a certificate; raises ValueError naming it."""
    host = host.strip()
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    ok = bool(host) and len(host) <= 253 and all(
        0 < len(label) <= 63
        and label.replace("-", "").isalnum()
        and not label.startswith("-")
        and not label.endswith("-")
        for label in labels
    )
    if not ok:
        raise ValueError(
            f"--server-host {host!r} is neither an IP address nor a DNS name "
            "(letters, digits and '-' in dot-separated labels)"
        )
    return host


@dataclass(frozen=True)
class Authority:
    """The project's root CA."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, project: str) -> Authority:
        """A new self-signed CA (P-384, SHA-384) for the project."""
        key = ec.generate_private_key(CURVE)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, project),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{project} medfed root CA"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA384())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, key_path: Path, cert_path: Path) -> Authority:
        """The CA from its PEM key and certificate."""
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: not an EC private key")
        return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))

    def issue_server_cert(
        self, hosts: Sequence[str]
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A TLS server key and certificate naming every host (plus the loopback names)."""
        names = list(dict.fromkeys([*hosts, *LOOPBACK_NAMES]))
        key = ec.generate_private_key(CURVE)
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName([san_entry(h) for h in names]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA384())
        )
        return key, cert

    def issue_operator_cert(
        self, name: str, public_key: ec.EllipticCurvePublicKey
    ) -> x509.Certificate:
        """An operator's client certificate: CN=name, OU=medfed-operator, clientAuth only."""
        now = _now()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, OPERATOR_OU),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=OPERATOR_DAYS),
                                 self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA384())
        )

    def revocation_list(
        self, revoked: Sequence[tuple[int, dt.datetime]]
    ) -> x509.CertificateRevocationList:
        """A CRL of these (serial, revoked at) pairs, valid until the CA itself expires.

        The aggregator holds no CA key, so it cannot re-sign a CRL that is about to expire;
        the list therefore stays valid as long as the CA, and each revocation writes a new one.
        """
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(self.cert.not_valid_after_utc)
        )
        for serial, when in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(when)
                .build()
            )
        return builder.sign(self.key, hashes.SHA384())


def generate_operator_key() -> ec.EllipticCurvePrivateKey:
    """A new operator key (EC P-256): TLS client authentication and run signing."""
    return ec.generate_private_key(OPERATOR_CURVE)


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    """A CRL as PEM."""
    return crl.public_bytes(serialization.Encoding.PEM)


def load_crl(path: Path, ca_cert: Path) -> x509.CertificateRevocationList:
    """A PEM CRL signed by the CA in `ca_cert`; raises ValueError naming the file."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
        ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    except OSError as exc:
        raise ValueError(f"{exc.filename}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not a PEM certificate revocation list ({exc})") from None
    public = ca.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(public):
        raise ValueError(f"{path}: not signed by the project CA in {ca_cert}")
    return crl


def cert_pem(cert: x509.Certificate) -> bytes:
    """A certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def tls_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A TLS private key as unencrypted PKCS#8 PEM (the SuperLink reads no passphrase)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_hosts(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses in a certificate's SANs."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*san.get_values_for_type(x509.DNSName)] + [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


@dataclass(frozen=True)
class SiteKeyPair:
    """A SuperNode's authentication key pair, in the OpenSSH forms Flower reads."""

    private_openssh: bytes
    public_openssh: str

    @classmethod
    def generate(cls, site: str) -> SiteKeyPair:
        """A fresh key pair whose public line is commented with the site name."""
        key = ec.generate_private_key(CURVE)
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        return cls(private, f"{public.decode()} {site}")


def load_public_key(line: str, *, where: str) -> ec.EllipticCurvePublicKey:
    """Parse an OpenSSH public key line; raises ValueError naming `where`."""
    try:
        key = serialization.load_ssh_public_key(line.strip().encode())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{where}: SuperNode keys must be elliptic-curve (NIST P-384) keys")
    return key


def public_key_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    """The key as Flower's Control API takes and lists it (PEM SubjectPublicKeyInfo)."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def fingerprint(line: str) -> str:
    """SHA256 fingerprint of an OpenSSH public key line, as `ssh-keygen -l` prints it."""
    blob = base64.b64decode(line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def private_key_matches(private_openssh: bytes, public_line: str) -> bool:
    """Whether an OpenSSH private key belongs to a public key line."""
    key = serialization.load_ssh_private_key(private_openssh, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return False
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return public.decode().split()[:2] == public_line.split()[:2]
