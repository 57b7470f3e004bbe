"""Site names and run keys name files and leave the site: no paths, no identifiers (issue 18)."""

import tomllib
from pathlib import Path

import pytest
import tomli_w
from typer.testing import CliRunner

from common.config import ConfigError, RunConfig
from common.kit import KIT_FILE, KitError, SiteKit
from common.sites import SiteRef, check_site_name, is_safe_site_name
from medfed.cli import app
from server.provision import provision

GOOD = ["site-a", "hospital-b", "st-marys", "h1", "site-0001", "cardio.2024", "A" * 64]
BAD = {
    "Jensen Hugo MRN A0383114630": "no spaces, paths or separators",
    "Jensen_Hugo_MRN_A0383114630": "holds the number '0383114630'",
    "JensenHugoMRN": "holds 'mrn'",
    "patient-7": "holds 'patient'",
    "dob-19800101": "holds the number",
    "../escape": "no spaces, paths or separators",
    "a/b": "no spaces, paths or separators",
    "Doe^John": "no spaces, paths or separators",
    ".hidden": "starting with a letter or digit",
    "A" * 65: "1-64 letters",
    "": "1-64 letters",
}


@pytest.mark.parametrize("name", GOOD)
def test_ordinary_site_names_pass(name: str) -> None:
    assert is_safe_site_name(name)
    assert check_site_name(name, where="--sites") == name


@pytest.mark.parametrize(("name", "why"), list(BAD.items()))
def test_paths_separators_and_identifiers_are_not_site_names(name: str, why: str) -> None:
    assert not is_safe_site_name(name)
    with pytest.raises(ValueError, match=r"--sites: site name .*" + _re(why)):
        check_site_name(name, where="--sites")
    with pytest.raises(ValueError, match=_re(why)):
        SiteRef(name, Path("data"), Path("state"))


def _re(text: str) -> str:
    import re

    return re.escape(text)


def test_provision_refuses_an_identifier_as_a_site_name(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [
        "provision", "--project", "p", "--server-host", "127.0.0.1", "--out",
        str(tmp_path / "kits"), "--sites", "site-a,Jensen_Hugo_MRN_A0383114630",
    ])
    assert result.exit_code == 2, result.output
    assert "--sites: 'Jensen_Hugo_MRN_A0383114630' is not a valid site name" in result.output
    assert "patient identifier" in result.output


def test_medfed_site_refuses_a_kit_whose_site_name_is_an_identifier(tmp_path: Path) -> None:
    kits = tmp_path / "kits"
    provision(kits, project="p", server_hosts=["127.0.0.1"], sites=["site-a"])
    kit = kits / "sites" / "site-a"
    values = tomllib.loads((kit / KIT_FILE).read_text())
    values["site"] = "Jensen_Hugo_MRN_A0383114630"
    (kit / KIT_FILE).write_text(tomli_w.dumps(values))
    with pytest.raises(KitError, match="patient identifier"):
        SiteKit.load(kit)
    data = tmp_path / "data"
    data.mkdir()
    result = CliRunner().invoke(app, ["site", "--kit", str(kit), "--data", str(data),
                                      "--metrics-port", "0"])
    assert result.exit_code == 2, result.output
    assert f"--kit {kit}: site = 'Jensen_Hugo_MRN_A0383114630'" in " ".join(result.output.split())


@pytest.mark.parametrize("key", ["../../etc/passwd", "a/b", "run key", ".hidden", "x" * 65, "a\\b"])
def test_run_key_is_a_file_name_not_a_path(key: str) -> None:
    with pytest.raises(ConfigError, match=r"--run-key must be 1-64 letters.*no path"):
        RunConfig(run_key=key)
    with pytest.raises(ConfigError, match="--run-key"):
        RunConfig.from_mapping({"run-key": key})


@pytest.mark.parametrize("key", ["", "12345678901234567890", "0f3c" * 8, "secagg-test"])
def test_run_keys_medfed_makes_pass(key: str) -> None:
    # Flower run ids (server/app.py) and uuid4 hex (medfed simulate)
    assert RunConfig(run_key=key).run_key == key
