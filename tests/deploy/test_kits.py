"""Provisioning: file modes, certificate names, what each kit may and may not hold."""

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.certs import cert_hosts, fingerprint, private_key_matches
from common.kit import KitError, OperatorKit, ServerKit, SiteKit, check_private
from server.provision import add_site, provision, revoke_site

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
    # the operator holds its run-signing key only
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
