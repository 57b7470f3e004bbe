"""Signed runs: what the operator signs is exactly what a site can verify, and nothing else."""

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from common.runsign import (
    OPERATOR_KEY,
    SIGNATURE_KEY,
    RunSignatureError,
    load_private_key,
    new_operator_key,
    sign_run,
    signed_payload,
    verify_run,
)

FAB = "ab" * 32
CONFIG = {"dp": True, "target-epsilon": 8.0, "rounds": 3, "task": "classify", "lr": 3e-4}


@pytest.fixture(scope="module")
def operator() -> tuple[ec.EllipticCurvePrivateKey, str]:
    private, public = new_operator_key()
    return load_private_key(private, where="operator.key"), public


def _signed(operator: tuple[ec.EllipticCurvePrivateKey, str]) -> dict:
    return sign_run(CONFIG, fab_sha256=FAB, operator="operator", private_key=operator[0])


def test_a_signed_run_verifies_and_names_its_operator(operator) -> None:
    signed = _signed(operator)
    assert signed[OPERATOR_KEY] == "operator" and signed[SIGNATURE_KEY]
    assert {k: v for k, v in signed.items() if k not in (OPERATOR_KEY, SIGNATURE_KEY)} == CONFIG
    assert verify_run(signed, fab_sha256=FAB, trusted={"operator": operator[1]}) == "operator"
    # key order and the hash's case do not matter: the payload is canonical
    reordered = dict(reversed(list(signed.items())))
    assert verify_run(reordered, fab_sha256=FAB.upper(), trusted={"operator": operator[1]})


@pytest.mark.parametrize(
    ("key", "value"),
    [("dp", False), ("target-epsilon", 80.0), ("rounds", 30), ("task", "segment"),
     ("lr", 3e-3), ("target-epsilon", 8), ("min-sites", 1)],
)
def test_changing_or_adding_any_setting_breaks_the_signature(operator, key, value) -> None:
    tampered = {**_signed(operator), key: value}
    with pytest.raises(RunSignatureError, match="changed after the operator signed"):
        verify_run(tampered, fab_sha256=FAB, trusted={"operator": operator[1]})


def test_removing_a_setting_breaks_the_signature(operator) -> None:
    tampered = _signed(operator)
    del tampered["dp"]
    with pytest.raises(RunSignatureError, match="changed after"):
        verify_run(tampered, fab_sha256=FAB, trusted={"operator": operator[1]})


def test_another_app_bundle_breaks_the_signature(operator) -> None:
    with pytest.raises(RunSignatureError, match="does not match its app bundle"):
        verify_run(_signed(operator), fab_sha256="cd" * 32, trusted={"operator": operator[1]})


def test_a_signature_by_another_key_is_refused(operator) -> None:
    other, _ = new_operator_key()
    forged = sign_run(CONFIG, fab_sha256=FAB, operator="operator",
                      private_key=load_private_key(other, where="x"))
    with pytest.raises(RunSignatureError, match="changed after"):
        verify_run(forged, fab_sha256=FAB, trusted={"operator": operator[1]})


def test_an_unknown_or_renamed_operator_is_refused(operator) -> None:
    signed = _signed(operator)
    with pytest.raises(RunSignatureError, match="whom this site does not trust"):
        verify_run(signed, fab_sha256=FAB, trusted={})
    renamed = {**signed, OPERATOR_KEY: "mallory"}
    with pytest.raises(RunSignatureError, match="'mallory', whom this site does not trust"):
        verify_run(renamed, fab_sha256=FAB, trusted={"operator": operator[1]})


@pytest.mark.parametrize("drop", [SIGNATURE_KEY, OPERATOR_KEY])
def test_an_unsigned_run_is_refused(operator, drop) -> None:
    signed = _signed(operator)
    del signed[drop]
    with pytest.raises(RunSignatureError, match="not signed"):
        verify_run(signed, fab_sha256=FAB, trusted={"operator": operator[1]})
    # the app's empty defaults are no signature either
    with pytest.raises(RunSignatureError, match="not signed"):
        verify_run({**CONFIG, SIGNATURE_KEY: "", OPERATOR_KEY: ""}, fab_sha256=FAB,
                   trusted={"operator": operator[1]})


def test_a_garbled_signature_is_refused(operator) -> None:
    signed = _signed(operator)
    with pytest.raises(RunSignatureError, match="not base64"):
        verify_run({**signed, SIGNATURE_KEY: "%%%"}, fab_sha256=FAB,
                   trusted={"operator": operator[1]})
    flipped = bytearray(base64.b64decode(signed[SIGNATURE_KEY]))
    flipped[-1] ^= 1
    with pytest.raises(RunSignatureError, match="changed after"):
        verify_run({**signed, SIGNATURE_KEY: base64.b64encode(flipped).decode()},
                   fab_sha256=FAB, trusted={"operator": operator[1]})


def test_the_payload_keeps_types_and_refuses_what_flower_cannot_carry() -> None:
    # 8 and 8.0 are different settings to Flower (sint64 and double): they sign differently
    assert signed_payload({"e": 8}, fab_sha256=FAB) != signed_payload({"e": 8.0}, fab_sha256=FAB)
    assert signed_payload({"b": True}, fab_sha256=FAB) != signed_payload({"b": 1}, fab_sha256=FAB)
    with pytest.raises(RunSignatureError, match="finite"):
        signed_payload({"e": float("nan")}, fab_sha256=FAB)
    with pytest.raises(RunSignatureError, match="only bool, int, float and str"):
        signed_payload({"e": [1]}, fab_sha256=FAB)
    with pytest.raises(RunSignatureError, match="64 hex digits"):
        signed_payload({}, fab_sha256="abc")


def test_keys_of_the_wrong_kind_are_refused(tmp_path) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    from cryptography.hazmat.primitives import serialization

    pem = p384.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    with pytest.raises(RunSignatureError, match="P-256"):
        load_private_key(pem, where="operator.key")
    with pytest.raises(RunSignatureError, match="operator.key: not an unencrypted PEM"):
        load_private_key(b"garbage", where="operator.key")
