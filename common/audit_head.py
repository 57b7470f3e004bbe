"""The signed head of a site's audit trail: which entry is the last, signed with the site's key.

A hash chain shows an edited or reordered entry, but whoever can write the trail can also cut
its end, empty it, delete it or write a whole new chain. So after every append the site signs
the chain's head, the last entry's `seq` and `hash`, with its own key, keeps it beside the trail
(`STATE/audit.head`, client.audit_state) and sends it with the reply that entry describes; the
aggregator writes each site's latest head per round into results.json. A trail that no longer
ends in its signed head, or disagrees with a head the aggregator witnessed, was altered.

The format, for an auditor with other tools:
- key: the site's elliptic-curve key (P-384), the SuperNode key of its kit (`site.key`, OpenSSH
  format); a simulated site, which has no kit, gets one of its own in its state folder;
- signed bytes: the line `medfed-audit-head/1` (with its newline), then the canonical JSON
  (sorted keys, no spaces) of `{"hash": HASH, "seq": SEQ}`; signature: ECDSA with SHA-384, DER;
- `key` is the public key as an OpenSSH line, `fingerprint` as `ssh-keygen -l` prints it (the
  same as the server kit's record of the site's key).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord

from common.certs import CURVE, fingerprint

# the ConfigRecord every reply carries, and its keys (bytes and an int: opaque to the guard)
HEAD_RECORD = "audit-head"
RECORD_KEYS = frozenset({"seq", "hash", "signature", "key"})
# SecAgg+ replies are Flower's legacy FitRes/EvaluateRes, which keep only their metrics: there
# the same keys travel as metrics with this prefix
METRIC_PREFIX = "audit-head-"
_DOMAIN = b"medfed-audit-head/1\n"


class HeadError(ValueError):
    """A chain head that cannot be read; the message names where it came from."""


def signed_bytes(seq: int, hash_hex: str) -> bytes:
    """What the site signs for a head: the domain line, then canonical JSON of seq and hash."""
    return _DOMAIN + json.dumps({"hash": hash_hex, "seq": seq}, sort_keys=True,
                                separators=(",", ":")).encode()


def public_line(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    """The public key as an OpenSSH line (`ecdsa-sha2-nistp384 AAAA...`)."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def load_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An EC private key from an OpenSSH (a kit's site.key) or PEM file."""
    data = Path(path).read_bytes()
    try:
        key = (serialization.load_ssh_private_key(data, password=None)
               if b"OPENSSH PRIVATE KEY" in data
               else serialization.load_pem_private_key(data, password=None))
    except (ValueError, TypeError) as exc:
        raise HeadError(f"{path}: not a private key the audit trail can be signed with ({exc})"
                        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise HeadError(f"{path}: the audit trail is signed with an elliptic-curve key")
    return key


def new_signing_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh key (the kit's curve) and its OpenSSH private form, for a site without a kit."""
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    return key, private


def _hash_of(key: ec.EllipticCurvePublicKey) -> hashes.HashAlgorithm:
    # SHA-384 for the kit's P-384 keys; a smaller curve gets the hash its size matches
    return hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()


@dataclass(frozen=True)
class ChainHead:
    """The last entry of a trail (`seq`, `hash`), signed; `public_key` is an OpenSSH line."""

    seq: int
    hash: str
    signature: bytes
    public_key: str

    @classmethod
    def sign(cls, key: ec.EllipticCurvePrivateKey, *, seq: int, hash_hex: str) -> ChainHead:
        """The head after entry `seq` whose hash is `hash_hex`, signed with `key`."""
        public = key.public_key()
        signature = key.sign(signed_bytes(seq, hash_hex), ec.ECDSA(_hash_of(public)))
        return cls(seq, hash_hex, signature, public_line(public))

    @property
    def fingerprint(self) -> str:
        """The signing key's SHA256 fingerprint (as `ssh-keygen -l` prints it)."""
        return fingerprint(self.public_key)

    def signature_ok(self) -> bool:
        """Whether `signature` is the `public_key` holder's over this seq and hash."""
        try:
            public = serialization.load_ssh_public_key(self.public_key.encode())
        except (ValueError, TypeError, IndexError):
            return False
        if not isinstance(public, ec.EllipticCurvePublicKey):
            return False
        try:
            public.verify(self.signature, signed_bytes(self.seq, self.hash),
                          ec.ECDSA(_hash_of(public)))
        except InvalidSignature:
            return False
        return True

    def same_key(self, public_key: str) -> bool:
        """Whether `public_key` (an OpenSSH line, comment or not) is this head's signing key."""
        return public_key.split()[:2] == self.public_key.split()[:2]

    # --- as JSON (STATE/audit.head, results.json) ---------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values: the signature in hex, the key as its OpenSSH line."""
        return {"seq": self.seq, "hash": self.hash, "signature": self.signature.hex(),
                "key": self.public_key, "fingerprint": self.fingerprint}

    @classmethod
    def from_json(cls, data: object, *, where: str) -> ChainHead:
        """Read `to_json`'s form; HeadError names `where` when it is not one."""
        try:
            if not isinstance(data, Mapping):
                raise TypeError("not an object")
            seq, hash_hex = data["seq"], data["hash"]
            if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
                raise TypeError(f"seq {seq!r} is not an entry number")
            if not isinstance(hash_hex, str) or len(bytes.fromhex(hash_hex)) != 32:
                raise TypeError("hash is not a SHA-256 in hex")
            return cls(seq, hash_hex, bytes.fromhex(str(data["signature"])), str(data["key"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise HeadError(f"{where}: not an audit chain head ({exc})") from None

    # --- as a reply's ConfigRecord ------------------------------------------------------------

    def to_record(self) -> ConfigRecord:
        """The head as it travels: seq, and bytes for the hash, signature and key blob."""
        blob = base64.b64decode(self.public_key.split()[1])
        return ConfigRecord({"seq": self.seq, "hash": bytes.fromhex(self.hash),
                             "signature": self.signature, "key": blob})

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ChainHead:
        """Read `to_record`'s form (or `head_metrics`'s, unprefixed); HeadError if not one."""
        try:
            seq, hash_raw, signature, blob = (
                record["seq"], record["hash"], record["signature"], record["key"]
            )
            if not (isinstance(seq, int) and isinstance(hash_raw, bytes)
                    and isinstance(signature, bytes) and isinstance(blob, bytes)):
                raise TypeError("seq must be an int; hash, signature and key bytes")
            key = serialization.load_ssh_public_key(_line_of_blob(blob).encode())
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise TypeError("the key is not an elliptic-curve key")
        except (KeyError, TypeError, ValueError) as exc:
            raise HeadError(f"reply record {HEAD_RECORD!r}: not an audit chain head ({exc})"
                            ) from None
        return cls(seq, hash_raw.hex(), signature, public_line(key))


def head_metrics(record: Mapping[str, Any]) -> dict[str, Any]:
    """A head record's keys as legacy metrics (METRIC_PREFIX + key)."""
    return {METRIC_PREFIX + key: value for key, value in record.items()}


def head_in_metrics(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The head record a legacy reply's metrics carry (`head_metrics`), else None."""
    found = {k[len(METRIC_PREFIX):]: v for k, v in metrics.items() if k.startswith(METRIC_PREFIX)}
    return found or None


def _line_of_blob(blob: bytes) -> str:
    """An OpenSSH public key line from its wire blob, whose first field names the key type."""
    size = int.from_bytes(blob[:4], "big")
    kind = blob[4 : 4 + size]
    if not 0 < size <= 64 or len(kind) != size or not kind.isascii():
        raise ValueError("the key is not an OpenSSH public key blob")
    return f"{kind.decode()} {base64.b64encode(blob).decode()}"
