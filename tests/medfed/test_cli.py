from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import EXIT_BAD_INPUT, app
from simulations.synth import synthesize

runner = CliRunner()


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-hospitals")
    synthesize(root, sites=2, images_per_site=30, seed=5, test_images=40)
    return root


def test_check_data_accepts_a_good_site(hospitals: Path) -> None:
    result = runner.invoke(app, ["check-data", str(hospitals / "sites" / "hospital-01")])
    assert result.exit_code == 0, result.output
    assert "hospital-01" in result.output


def test_check_data_json(hospitals: Path) -> None:
    result = runner.invoke(app, ["check-data", "--json", str(hospitals / "sites" / "hospital-02")])
    assert result.exit_code == 0
    assert '"usable": true' in result.output


def test_check_data_refuses_a_folder_without_labels(tmp_path: Path) -> None:
    result = runner.invoke(app, ["check-data", str(tmp_path)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "labels.csv" in result.output


def test_check_data_refuses_a_site_of_corrupt_files(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(b"DICM" * 10)
    (tmp_path / "labels.csv").write_text("path,label\na.dcm,1\n")
    result = runner.invoke(app, ["check-data", str(tmp_path)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "a.dcm" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-epsilon", "-1"], "--target-epsilon must be > 0"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--fraction-train", "1.5"], "--fraction-train must be in (0, 1]"),
    ],
)
def test_simulate_rejects_bad_flags(hospitals: Path, tmp_path: Path, args, message) -> None:
    result = runner.invoke(
        app,
        ["simulate", "--data", str(hospitals / "sites"), "--out", str(tmp_path / "r"), *args],
    )
    assert result.exit_code == EXIT_BAD_INPUT
    assert message in result.output


def test_simulate_names_a_missing_data_folder(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["simulate", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == EXIT_BAD_INPUT
    assert "no such folder" in result.output


def test_simulate_refuses_to_overwrite_a_run(hospitals: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "results.json").write_text("{}")
    (run_dir / ".medfed-run.json").write_text('{"entries": ["results.json"]}')
    result = runner.invoke(
        app,
        ["simulate", "--data", str(hospitals / "sites"), "--out", str(run_dir),
         "--metrics-port", "0"],
    )
    assert result.exit_code == EXIT_BAD_INPUT
    assert "--resume" in result.output


def test_resume_without_checkpoint(tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", "--resume", str(tmp_path)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "no checkpoint" in result.output


def test_synth_rejects_bad_arguments(tmp_path: Path) -> None:
    result = runner.invoke(app, ["synth", "--sites", "0", "--out", str(tmp_path / "x")])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "--sites" in result.output
