"""Signed runs: the operator signs what a run is; each site verifies it before it trains.

What is signed, and why it can be verified at the site: `flwr run APP --run-config FILE` sends
the app bundle (FAB) and the run-config overrides; the SuperLink stores the overrides as the run's
`override_config` unchanged (flwr 1.41 `control_handlers.start_run`: it only checks that every
key exists among the app's defaults), and every SuperNode receives that `Run` and the FAB.
The config the app runs with is Flower's fusion of the FAB's `[tool.flwr.app.config]` defaults
with those overrides (`get_fused_config_from_fab`). So the operator signs

    canonical JSON of {"fab-sha256": SHA-256 of the FAB, "run-config": the overrides}

(the overrides without the two signature keys below). A site recomputes the FAB's hash from the
bytes it received and reads the overrides from the `Run`: both are exactly what was signed.
The defaults are inside the FAB, which the hash covers, so the whole effective config is
authenticated, and a site can check its policy on it (client.policy).

The signature (ECDSA P-256 with SHA-256, base64 of its DER form) and the signer's name travel
inside the overrides, as `run-signature` and `run-operator`: Flower carries nothing else from
the operator to the sites. The app declares both keys with empty defaults, so Flower accepts
them, and common.config.RunConfig carries them without their changing training.

A compromised aggregator cannot change a signed run's settings or app, nor forge a run; it can
replay a signed run as it was signed, which every site then trains only as its policy allows.
This module imports no flwr: the operator's CLI and the site's check both use it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

SIGNATURE_KEY = "run-signature"
OPERATOR_KEY = "run-operator"
SIGNATURE_KEYS = (SIGNATURE_KEY, OPERATOR_KEY)
_HASH = re.compile(r"[0-9a-f]{64}")


class RunSignatureError(ValueError):
    """A run's signature is missing, malformed, from an unknown operator or does not match."""


def _canonical(value: Any, where: str) -> Any:
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RunSignatureError(f"run config {where} = {value!r} is not a finite number")
        return value
    raise RunSignatureError(
        f"run config {where} = {value!r}: only bool, int, float and str travel in a run config"
    )


def signed_payload(config: Mapping[str, Any], *, fab_sha256: str) -> bytes:
    """The exact bytes an operator signs: the FAB hash and the overrides, as canonical JSON.

    The signature keys themselves are left out; key order does not matter.
    """
    digest = fab_sha256.strip().lower()
    if not _HASH.fullmatch(digest):
        raise RunSignatureError(f"FAB hash {fab_sha256!r} is not 64 hex digits")
    values = {
        str(k): _canonical(v, str(k)) for k, v in config.items() if k not in SIGNATURE_KEYS
    }
    document = {"fab-sha256": digest, "run-config": values}
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def load_private_key(pem: bytes, *, where: str) -> ec.EllipticCurvePrivateKey:
    """An operator's EC P-256 private key (PKCS8 PEM, unencrypted); RunSignatureError if not."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise RunSignatureError(f"{where}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise RunSignatureError(f"{where}: the operator's key must be an EC P-256 key")
    return key


def load_public_key(pem: str | bytes, *, where: str) -> ec.EllipticCurvePublicKey:
    """An operator's EC P-256 public key (SubjectPublicKeyInfo PEM); RunSignatureError if not."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise RunSignatureError(f"{where}: not a PEM public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise RunSignatureError(f"{where}: an operator's key must be an EC P-256 key")
    return key


def new_operator_key() -> tuple[bytes, str]:
    """A fresh operator key: (private key as PKCS8 PEM, public key as PEM text)."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return private, public_pem(key.public_key())


def public_pem(key: ec.EllipticCurvePublicKey) -> str:
    """A public key as SubjectPublicKeyInfo PEM text (what a site kit lists)."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def sign_run(
    config: Mapping[str, Any], *, fab_sha256: str, operator: str,
    private_key: ec.EllipticCurvePrivateKey,
) -> dict[str, Any]:
    """The overrides with `run-signature` and `run-operator` added: what `flwr run` must send."""
    if not operator:
        raise RunSignatureError("the operator's name is empty; set `name` in the operator kit")
    signature = private_key.sign(
        signed_payload(config, fab_sha256=fab_sha256), ec.ECDSA(hashes.SHA256())
    )
    signed = {k: v for k, v in config.items() if k not in SIGNATURE_KEYS}
    signed[SIGNATURE_KEY] = base64.b64encode(signature).decode()
    signed[OPERATOR_KEY] = operator
    return signed


def verify_run(
    config: Mapping[str, Any], *, fab_sha256: str, trusted: Mapping[str, str]
) -> str:
    """The name of the trusted operator who signed this run; RunSignatureError otherwise.

    Args:
        config: the overrides as the site received them (signature keys included).
        fab_sha256: the hash of the FAB bytes the site received (computed, not reported).
        trusted: operator name -> public key PEM, from the site's kit.

    """
    operator = str(config.get(OPERATOR_KEY, ""))
    encoded = str(config.get(SIGNATURE_KEY, ""))
    if not encoded or not operator:
        raise RunSignatureError("the run is not signed by an operator")
    if operator not in trusted:
        raise RunSignatureError(f"the run is signed by operator {operator!r}, whom this site "
                                "does not trust")
    key = load_public_key(trusted[operator], where=f"operator {operator}'s public key")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise RunSignatureError("the run's signature is not base64") from None
    try:
        key.verify(signature, signed_payload(config, fab_sha256=fab_sha256),
                   ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise RunSignatureError(
            f"the run's signature by operator {operator!r} does not match its app bundle and "
            "settings: they were changed after the operator signed them"
        ) from None
    return operator
