"""A privacy budget is a finite epsilon > 0 wherever it is given; anything else exits 2, named."""

import re
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from typer.testing import CliRunner

from client.site_privacy import _budget
from common.config import ConfigError, RunConfig
from common.kit import KIT_FILE, KitError, SiteKit
from medfed.cli import app
from server.provision import provision

BAD = ["nan", "inf", "-inf", "-1", "0"]


def _text(output: str) -> str:
    """The output's words, without the boxes and line breaks rich draws around an error."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


@pytest.mark.parametrize("value", BAD)
def test_simulate_rejects_a_budget_that_is_not_a_finite_positive_epsilon(
    tmp_path: Path, value: str
) -> None:
    result = CliRunner().invoke(app, ["simulate", "--data", str(tmp_path), "--out",
                                      str(tmp_path / "run"), f"--budget-epsilon={value}"])
    assert result.exit_code == 2, result.output
    text = _text(result.output)
    assert "--budget-epsilon" in text and "finite epsilon > 0" in text
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def site_kit(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kits")
    provision(root / "kits", project="p", server_hosts=["127.0.0.1"], sites=["h1"])
    return root / "kits" / "sites" / "h1"


@pytest.mark.parametrize("value", BAD)
def test_site_rejects_a_budget_that_is_not_a_finite_positive_epsilon(
    site_kit: Path, tmp_path: Path, value: str
) -> None:
    result = CliRunner().invoke(app, ["site", "--kit", str(site_kit), "--data", str(tmp_path),
                                      f"--budget-epsilon={value}"])
    assert result.exit_code == 2, result.output
    assert "finite epsilon > 0" in _text(result.output)


@pytest.mark.parametrize("value", ["nan", "inf", "-1.0", "0", '"8"'])
def test_the_site_kit_rejects_a_budget_that_is_not_a_finite_positive_epsilon(
    site_kit: Path, tmp_path: Path, value: str
) -> None:
    import shutil

    kit = tmp_path / "h1"
    shutil.copytree(site_kit, kit)
    path = kit / KIT_FILE
    budget_line = f'site = "h1"\nbudget-epsilon = {value}'
    path.write_text(path.read_text().replace('site = "h1"', budget_line))
    with pytest.raises(KitError, match="budget-epsilon must be a finite epsilon > 0") as bad:
        SiteKit.load(kit, check_permissions=False)
    assert str(path) in str(bad.value)
    result = CliRunner().invoke(app, ["site", "--kit", str(kit), "--data", str(tmp_path)])
    assert result.exit_code == 2, result.output


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "lots"])
def test_a_node_config_budget_that_is_not_a_finite_positive_epsilon_is_refused(
    tmp_path: Path, value: str
) -> None:
    context = Context(run_id=1, node_id=1, node_config={"data-path": str(tmp_path),
                                                        "budget-epsilon": value},
                      state=RecordDict(), run_config={})
    raw: object = value if value == "lots" else float(value)
    context.node_config["budget-epsilon"] = raw  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="node config's budget-epsilon"):
        _budget(context, RunConfig())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_a_run_config_budget_that_is_not_finite_or_is_negative_is_refused(value: float) -> None:
    with pytest.raises(ConfigError, match="--budget-epsilon"):
        RunConfig(budget_epsilon=value)
    with pytest.raises(ConfigError, match="--budget-epsilon"):
        RunConfig.from_mapping({"budget-epsilon": value})


def test_a_good_budget_is_kept_everywhere(tmp_path: Path) -> None:
    assert RunConfig(budget_epsilon=8.0).budget_epsilon == 8.0
    assert RunConfig().budget_epsilon == 0.0  # a run config's 0: no budget
    context = Context(run_id=1, node_id=1, node_config={"data-path": str(tmp_path),
                                                        "budget-epsilon": 8.0},
                      state=RecordDict(), run_config={})
    assert _budget(context, RunConfig())[0] == 8.0


def test_a_site_with_a_damaged_ledger_does_not_start_and_names_the_file(
    site_kit: Path, tmp_path: Path
) -> None:
    import numpy as np

    from tests.simulations.conftest import write_easy_site

    data, ledgers = tmp_path / "site", tmp_path / "ledgers"
    write_easy_site(data, 10, 0.5, np.random.default_rng(0))
    ledgers.mkdir()
    (ledgers / "ledger.json").write_text('{"format": "medfed-ledger/2", "spe')
    result = CliRunner().invoke(app, ["site", "--kit", str(site_kit), "--data", str(data),
                                      "--budget-epsilon", "8", "--ledger-dir", str(ledgers),
                                      "--metrics-port", "0"])
    assert result.exit_code == 2, result.output
    text = _text(result.output)
    assert str(ledgers / "ledger.json") in text.replace(" ", "")
    assert "never read as zero spent" in text


def test_site_on_an_unchecked_flower_exits_1_naming_the_version_before_it_waits(
    site_kit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flwr

    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    result = CliRunner().invoke(app, ["site", "--kit", str(site_kit), "--data", str(tmp_path)])
    assert result.exit_code == 1, result.output
    text = _text(result.output)
    assert "Flower 9.9.9 is installed" in text and "Traceback" not in text
