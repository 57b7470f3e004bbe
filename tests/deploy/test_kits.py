"""Provisioning: file modes, certificate names, what each kit may and may not hold."""

import datetime as dt
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from common.certs import (
    Authority,
    cert_hosts,
    cert_pem,
    fingerprint,
    load_crl,
    private_key_matches,
)
from common.kit import KitError, SiteKit, check_private
from common.operator_kit import OperatorKit
from common.server_kit import ServerKit
from server.provision import add_operator, add_site, provision, revoke_operator, revoke_site

SITES = ["hospital-a", "hospital-b", "hospital-c"]


@pytest.fixture()
def kits(tmp_path: Path) -> Path:
    out = tmp_path / "kits"
    provision(out, project="test", server_hosts=["fl.example.org", "10.1.2.3"], sites=SITES)
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _private_keys(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and b"PRIVATE KEY" in
            p.read_bytes()}


def test_private_keys_are_0600_and_kit_folders_private(kits: Path) -> None:
    keys = _private_keys(kits)
    assert {p.relative_to(kits).as_posix() for p in keys} == {
        "ca/ca.key", "server/server.key", "operator/operator.key",
        *(f"sites/{s}/site.key" for s in SITES),
    }
    for path in keys:
        assert _mode(path) == 0o600, path
        assert _mode(path.parent) == 0o700, path.parent


def test_no_kit_holds_another_partys_private_key(kits: Path) -> None:
    every_key = _private_keys(kits)
    for kit_dir in [kits / "server", kits / "operator", *(kits / "sites" / s for s in SITES)]:
        own = {p for p in every_key if p.parent == kit_dir}
        contents = b"".join(p.read_bytes() for p in kit_dir.rglob("*") if p.is_file())
        for path, key in every_key.items():
            if path not in own:
                assert key not in contents, f"{kit_dir} holds {path}"
    assert set(_private_keys(kits / "operator")) == {kits / "operator" / "operator.key"}


def test_server_certificate_names_every_host_and_chains_to_the_ca(kits: Path) -> None:
    cert = x509.load_pem_x509_certificate((kits / "server" / "server.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((kits / "ca" / "ca.crt").read_bytes())
    assert {"fl.example.org", "10.1.2.3", "localhost", "127.0.0.1"} <= set(cert_hosts(cert))
    cert.verify_directly_issued_by(ca)
    for kit_dir in [kits / "server", kits / "operator", kits / "sites" / "hospital-a"]:
        assert (kit_dir / "ca.crt").read_bytes() == (kits / "ca" / "ca.crt").read_bytes()


def test_site_keys_are_flower_supernode_keys(kits: Path) -> None:
    server = ServerKit.load(kits / "server")
    assert [s.name for s in server.sites] == SITES
    for entry in server.sites:
        site = SiteKit.load(kits / "sites" / entry.name)
        assert site.site == entry.name and site.superlink == "fl.example.org:9092"
        key = serialization.load_ssh_private_key(site.private_key.read_bytes(), password=None)
        assert key.curve.name == "secp384r1"  # type: ignore[union-attr]
        assert private_key_matches(site.private_key.read_bytes(), entry.public_key)
    assert OperatorKit.load(kits / "operator").superlink == "fl.example.org:9092"


def test_flower_accepts_the_site_public_key(kits: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    pem = try_load_public_key(kits / "sites" / "hospital-a" / "site.pub")
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")


def test_existing_kits_are_kept_without_force(kits: Path) -> None:
    before = (kits / "server" / "server.key").read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        provision(kits, project="test", server_hosts=["fl.example.org"], sites=SITES)
    assert (kits / "server" / "server.key").read_bytes() == before
    provision(kits, project="test", server_hosts=["fl.example.org"], sites=["x"], force=True)
    assert (kits / "server" / "server.key").read_bytes() != before
    assert not (kits / "sites" / "hospital-a").exists()


def test_add_site_issues_one_kit_and_changes_no_other_key(kits: Path) -> None:
    before = {p: p.read_bytes() for p in kits.rglob("*") if p.is_file()}
    folder, superlink = add_site(kits, "hospital-d")
    assert folder == kits / "sites" / "hospital-d" and superlink == "fl.example.org:9092"
    after = {p: p.read_bytes() for p in kits.rglob("*") if p.is_file()}
    changed = {p.relative_to(kits).as_posix() for p in before if before[p] != after[p]}
    assert changed == {"server/medfed-kit.toml"}
    server = ServerKit.load(kits / "server")
    assert [s.name for s in server.sites] == [*SITES, "hospital-d"]
    assert _mode(folder / "site.key") == 0o600
    with pytest.raises(FileExistsError, match="revoke"):
        add_site(kits, "hospital-d")


def test_revoke_site_removes_its_authorisation_and_kit(kits: Path) -> None:
    line = (kits / "sites" / "hospital-b" / "site.pub").read_text()
    revoke_site(kits, "hospital-b")
    server = ServerKit.load(kits / "server")
    assert [s.name for s in server.sites] == ["hospital-a", "hospital-c"]
    assert server.revoked["hospital-b"]["fingerprint"] == fingerprint(line)
    assert not (kits / "sites" / "hospital-b").exists()
    with pytest.raises(ValueError, match="no provisioned site"):
        revoke_site(kits, "hospital-b")
    add_site(kits, "hospital-b")  # re-issued with a new key
    assert (kits / "sites" / "hospital-b" / "site.pub").read_text() != line


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"server_hosts": ["bad host!"]}, "neither an IP address nor a DNS name"),
        ({"server_hosts": [""]}, "--server-host"),
        ({"sites": ["ok", "../escape"]}, "not a valid site name"),
        ({"sites": ["a", "a"]}, "more than once"),
        ({"project": " "}, "--project"),
    ],
)
def test_bad_provision_input_is_named(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"project": "p", "server_hosts": ["fl.example.org"], "sites": ["a"], **kwargs}
    with pytest.raises(ValueError, match=message):
        provision(tmp_path / "kits", **args)


def test_kit_checks_say_what_is_wrong(kits: Path, tmp_path: Path) -> None:
    with pytest.raises(KitError, match="server kit, but this command needs the site kit"):
        SiteKit.load(kits / "server")
    with pytest.raises(KitError, match="not a medfed kit"):
        SiteKit.load(kits / "sites")
    with pytest.raises(KitError, match="no such kit folder"):
        ServerKit.load(tmp_path / "nowhere")
    key = kits / "sites" / "hospital-a" / "site.key"
    key.chmod(0o644)
    with pytest.raises(KitError, match="chmod 600"):
        check_private(key)
    with pytest.raises(KitError, match="chmod 600"):
        SiteKit.load(kits / "sites" / "hospital-a")
    key.chmod(0o440)  # a Kubernetes Secret mounted with fsGroup: group-readable, still accepted
    check_private(key)
    (kits / "sites" / "hospital-c" / "site.key").unlink()
    with pytest.raises(KitError, match="missing site.key"):
        SiteKit.load(kits / "sites" / "hospital-c")


def test_provision_cli_end_to_end(tmp_path: Path) -> None:
    cli = [str(Path(sys.executable).parent / "medfed")]
    out = tmp_path / "kits"
    args = ["provision", "--project", "p", "--server-host", "127.0.0.1", "--sites", "a,b"]
    done = subprocess.run([*cli, *args, "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    again = subprocess.run([*cli, *args, "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "--force" in again.stderr
    added = subprocess.run(
        [*cli, "provision", "add-site", "c", "--kits", str(out)], capture_output=True, text=True
    )
    assert added.returncode == 0, added.stderr
    assert (out / "sites" / "c" / "site.key").is_file()
    missing = subprocess.run([*cli, "provision", "--project", "p"], capture_output=True, text=True)
    assert missing.returncode == 2 and "required" in missing.stderr


def test_fleet_and_control_addresses_behind_an_ingress(tmp_path: Path) -> None:
    out = tmp_path / "kits"
    provision(
        out, project="p", server_hosts=["fl.example.org"], sites=["a"],
        fleet_address="fl.example.org:443", control_address="control.example.org:443",
    )
    assert SiteKit.load(out / "sites" / "a").superlink == "fl.example.org:443"
    assert OperatorKit.load(out / "operator").superlink == "control.example.org:443"
    cert = x509.load_pem_x509_certificate((out / "server" / "server.crt").read_bytes())
    assert {"fl.example.org", "control.example.org"} <= set(cert_hosts(cert))
    assert ServerKit.load(out / "server").port == 9092  # where the SuperLink itself listens
    add_site(out, "b")
    assert SiteKit.load(out / "sites" / "b").superlink == "fl.example.org:443"
    with pytest.raises(ValueError, match="--control-address"):
        provision(tmp_path / "k2", project="p", server_hosts=["h"], sites=[],
                  control_address="no-port")


# --- operator certificates -------------------------------------------------------------------


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _crl_serials(kits: Path) -> set[int]:
    crl = load_crl(kits / "server" / "operators.crl", kits / "server" / "ca.crt")
    return {r.serial_number for r in crl}


def test_the_operator_kit_holds_a_client_certificate_of_the_ca(kits: Path) -> None:
    operator = OperatorKit.load(kits / "operator")
    assert operator.name == "operator"
    assert (operator.cert, operator.key) == (
        kits / "operator" / "operator.crt", kits / "operator" / "operator.key"
    )
    cert = _cert(operator.cert)
    cert.verify_directly_issued_by(_cert(kits / "ca" / "ca.crt"))
    assert cert.subject.rfc4514_string() == "CN=operator,OU=medfed-operator"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    key = serialization.load_pem_private_key(operator.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert b"BEGIN PRIVATE KEY" in operator.key.read_bytes()  # PKCS#8, unencrypted
    assert key.public_key() == cert.public_key()
    server = ServerKit.load(kits / "server")
    assert [(o.name, o.serial) for o in server.operators] == [("operator", cert.serial_number)]
    assert _crl_serials(kits) == set()  # an empty, CA-signed list at provision time
    # the server's own certificate is no client certificate
    server_eku = _cert(kits / "server" / "server.crt").extensions.get_extension_for_class(
        x509.ExtendedKeyUsage
    ).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH not in list(server_eku)


def test_provision_names_the_first_operator(tmp_path: Path) -> None:
    provision(tmp_path / "k", project="p", server_hosts=["h.example"], sites=[], operator="ops")
    assert OperatorKit.load(tmp_path / "k" / "operator").name == "ops"
    assert "CN=ops," in _cert(tmp_path / "k" / "operator" / "operator.crt").subject.rfc4514_string()
    with pytest.raises(ValueError, match="not a valid operator name"):
        provision(tmp_path / "k2", project="p", server_hosts=["h"], sites=[], operator="a/b")


def test_add_and_revoke_operator(kits: Path) -> None:
    before = {p: p.read_bytes() for p in kits.rglob("*") if p.is_file()}
    folder, control = add_operator(kits, "alice")
    assert folder == kits / "operators" / "alice" and control == "fl.example.org:9092"
    alice = OperatorKit.load(folder)
    assert alice.name == "alice" and alice.superlink == control
    assert _mode(alice.key) == 0o600 and _mode(folder) == 0o700
    changed = {p.relative_to(kits).as_posix() for p in before if before[p] != p.read_bytes()}
    site_kits = sorted((kits / "sites").iterdir())
    # the server kit records the certificate; the site kits kept here trust its signed runs
    assert changed == {"server/medfed-kit.toml"} | {
        f"sites/{site.name}/medfed-kit.toml" for site in site_kits
    }
    for site in site_kits:
        trusted = {o.name: o.public_key for o in SiteKit.load(site).operators}
        assert trusted["alice"] == (folder / "operator.pub").read_text()
    with pytest.raises(FileExistsError, match="revoke"):
        add_operator(kits, "alice")
    with pytest.raises(ValueError, match="not a valid operator name"):
        add_operator(kits, "../x")

    serial = _cert(alice.cert).serial_number
    revoke_operator(kits, "alice")
    assert _crl_serials(kits) == {serial}
    assert [o.name for o in ServerKit.load(kits / "server").operators] == ["operator"]
    assert not alice.key.exists()  # no copy of the revoked key stays in KITS
    for site in site_kits:  # nor does a site kit kept here trust it
        assert "alice" not in {o.name for o in SiteKit.load(site).operators}
    with pytest.raises(ValueError, match="no operator 'alice'"):
        revoke_operator(kits, "alice")
    add_operator(kits, "alice")  # re-issued: a new certificate, the old one stays revoked
    assert _cert(alice.cert).serial_number != serial
    revoke_operator(kits, "operator")
    assert len(_crl_serials(kits)) == 2 and serial in _crl_serials(kits)
    with pytest.raises(KitError, match="missing operator.crt, operator.key"):
        OperatorKit.load(kits / "operator")


def test_operator_commands_without_the_ca_key_say_where_to_run_them(kits: Path) -> None:
    (kits / "ca" / "ca.key").unlink()
    with pytest.raises(KitError, match="CA key"):
        add_operator(kits, "alice")


def test_a_server_kit_without_a_crl_is_named_and_add_operator_writes_one(kits: Path) -> None:
    (kits / "server" / "operators.crl").unlink()
    with pytest.raises(KitError, match="missing operators.crl.*add-operator"):
        ServerKit.load(kits / "server")
    add_operator(kits, "alice")
    assert ServerKit.load(kits / "server").operators_crl.is_file()


def test_operator_kit_checks(kits: Path) -> None:
    from server.submit import check_credentials

    operator = OperatorKit.load(kits / "operator")
    check_credentials(operator)
    operator.key.chmod(0o644)
    with pytest.raises(KitError, match="chmod 600"):
        OperatorKit.load(kits / "operator")
    operator.key.chmod(0o600)
    other = tmp_kits = kits.parent / "other"
    provision(tmp_kits, project="o", server_hosts=["h"], sites=[])
    shutil.copy(other / "operator" / "operator.crt", operator.cert)
    with pytest.raises(KitError, match="not the key of"):
        check_credentials(operator)
    shutil.copy(other / "operator" / "operator.key", operator.key)
    with pytest.raises(KitError, match="not issued by the kit's CA"):
        check_credentials(operator)


def test_an_expired_operator_certificate_is_named_with_the_fix(kits: Path) -> None:
    from server.submit import check_credentials

    ca = Authority.load(kits / "ca" / "ca.key", kits / "ca" / "ca.crt")
    operator = OperatorKit.load(kits / "operator")
    key = serialization.load_pem_private_key(operator.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    fresh = ca.issue_operator_cert("operator", key.public_key())
    expired = (
        x509.CertificateBuilder(extensions=list(fresh.extensions))
        .subject_name(fresh.subject).issuer_name(fresh.issuer).public_key(key.public_key())
        .serial_number(fresh.serial_number)
        .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2021, 1, 1, tzinfo=dt.UTC))
        .sign(ca.key, hashes.SHA384())
    )
    operator.cert.write_bytes(cert_pem(expired))
    with pytest.raises(KitError, match="expired on 2021-01-01.*add-operator"):
        check_credentials(operator)


def test_operator_cli_commands(tmp_path: Path) -> None:
    cli = [str(Path(sys.executable).parent / "medfed")]
    out = tmp_path / "kits"
    subprocess.run(
        [*cli, "provision", "--project", "p", "--server-host", "127.0.0.1", "--sites", "a",
         "--operator", "ops", "--out", str(out)],
        check=True, capture_output=True,
    )
    added = subprocess.run([*cli, "provision", "add-operator", "bo b", "--kits", str(out)],
                           capture_output=True, text=True)
    assert added.returncode == 2 and "not a valid operator name" in added.stderr
    added = subprocess.run([*cli, "provision", "add-operator", "bob", "--kits", str(out)],
                           capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    revoked = subprocess.run([*cli, "provision", "revoke-operator", "bob", "--kits", str(out)],
                             capture_output=True, text=True)
    assert revoked.returncode == 0 and "operators.crl" in revoked.stdout
    again = subprocess.run([*cli, "provision", "revoke-operator", "bob", "--kits", str(out)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "valid: ops" in again.stderr
