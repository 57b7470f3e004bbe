"""A run's exit code, results.json and model file tell whether the model trained, and why not.

Tiny real simulations (2 sites x 30 DICOM images, 16 px, 1 round) through the `medfed` CLI.
"""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.outputs import MANIFEST
from medfed.cli import app
from medfed.console import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_REFUSED
from tests.simulations.conftest import write_easy_hospitals

runner = CliRunner()
TINY = ["--rounds", "1", "--local-steps", "2", "--image-size", "16", "--batch-size", "16",
        "--metrics-port", "0", "--min-sites", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Two sites of 30 images and a test folder."""
    sites = [("site-a", 30, 0.5), ("site-b", 30, 0.5)]
    return write_easy_hospitals(tmp_path_factory.mktemp("tiny"), sites, 20, seed=3)


def _simulate(data: Path, out: Path, *extra: str):
    return runner.invoke(
        app, ["simulate", "--data", str(data), "--out", str(out), *TINY, *extra],
        env={**os.environ, "COLUMNS": "200"},
    )


def test_every_site_refused_by_its_budget_exits_3_without_a_model(tiny: Path,
                                                                   tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _simulate(tiny / "sites", run_dir, "--budget-epsilon", "0.01",
                       "--ledger-dir", str(tmp_path / "ledgers"))
    assert result.exit_code == EXIT_REFUSED, result.output
    assert "Global model after" not in result.output
    assert "privacy budget refused" in result.output
    for site in ("site-a", "site-b"):
        assert f"{site}: refused" in result.output
    assert not (run_dir / "model.pt").exists()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["outcome"]["status"] == "refused"
    assert results["outcome"]["trained"] is False
    assert results["final"] == {"trained": False}
    assert set(results["outcome"]["sites"]) == {"site-a", "site-b"}

    # --force replaces the run, keeps a file of the user's, and refuses a model.pt that is
    # not medfed's (this run wrote none) without deleting anything
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "model.pt").write_text("my own model")
    again = _simulate(tiny / "sites", run_dir, "--budget-epsilon", "0.01",
                      "--ledger-dir", str(tmp_path / "ledgers"), "--force")
    assert again.exit_code == EXIT_BAD_INPUT, again.output
    assert "model.pt" in again.output and "Nothing was deleted" in again.output
    assert (run_dir / "results.json").is_file()
    (run_dir / "model.pt").unlink()
    again = _simulate(tiny / "sites", run_dir, "--budget-epsilon", "0.01",
                      "--ledger-dir", str(tmp_path / "ledgers"), "--force")
    assert again.exit_code == EXIT_REFUSED, again.output
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert "notes.txt" not in json.loads((run_dir / MANIFEST).read_text())["entries"]


def test_labels_out_of_range_are_refused_before_the_run_naming_each_site(
    tiny: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    for site in ("site-a", "site-b"):
        src = tiny / "sites" / site
        dst = data / site
        dst.mkdir(parents=True)
        for image in src.glob("*.dcm"):
            (dst / image.name).symlink_to(image)
        rows = (src / "labels.csv").read_text().splitlines()
        # label 7 with 2 classes at one site, an enormous label at the other
        bad = "7" if site == "site-a" else "99999999999"
        (dst / "labels.csv").write_text(
            "\n".join([rows[0], *(r.replace(",1,", f",{bad},") for r in rows[1:])]) + "\n"
        )
    run_dir = tmp_path / "run"
    result = _simulate(data, run_dir, "--test-data", str(tiny / "test"))
    # a site that cannot train is refused up front (as `medfed site` refuses it), not in Ray
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    output = " ".join(result.output.split())
    assert "site-a" in output and "site-b" in output and "--num-classes 2" in output
    assert not (run_dir / "model.pt").exists()


def test_a_run_in_which_no_site_can_train_exits_1_with_each_sites_reason(
    tiny: Path, tmp_path: Path
) -> None:
    """Every update is NaN (a misbehaving-site scenario): no site's update is aggregated."""
    scenario = tmp_path / "all-nan.toml"
    scenario.write_text(
        'name = "all-nan"\nsites = 2\n\n[data]\n'
        f'path = "{tiny / "sites" / "site-a"}"\npartition = "iid"\n\n'
        '[misbehave]\nfraction = 1.0\nkinds = ["nan"]\n'
    )
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app, ["simulate", "--scenario", str(scenario), "--out", str(run_dir), "--no-dp", *TINY],
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.exit_code == EXIT_FAILED, result.output
    assert "Global model after" not in result.output
    assert not (run_dir / "model.pt").exists()
    outcome = json.loads((run_dir / "results.json").read_text())["outcome"]
    assert outcome["status"] == "failed" and outcome["trained"] is False
    assert len(outcome["sites"]) == 2
    for site, entry in outcome["sites"].items():
        assert entry["kind"] == "screened_nan", entry
        assert site in result.output


def test_a_folder_that_is_not_a_run_is_refused(tiny: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "checkpoint").mkdir()
    (mine / "thesis.tex").write_text("x")
    result = _simulate(tiny / "sites", mine, "--force")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "not a medfed output folder" in result.output
    assert (mine / "thesis.tex").is_file() and (mine / "checkpoint").is_dir()

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = _simulate(tiny / "sites", a_file)
    assert result.exit_code == EXIT_BAD_INPUT
    assert f"{a_file} is a file" in result.output
