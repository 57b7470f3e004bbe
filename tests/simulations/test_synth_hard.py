"""medfed synth's hard layouts (issue 16), and the hard scenario end-to-end at a small size."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.cli import app
from simulations import synth
from simulations.synth import synthesize
from simulations.synth.layout import _hard_layout
from simulations.synth.sites import _site_labels, _site_profiles

runner = CliRunner()
HARD = Path(__file__).resolve().parents[2] / "simulations" / "scenarios" / "hard.toml"


def _labels(folder: Path) -> list[str]:
    with open(folder / "labels.csv", newline="") as f:
        return [row["label"] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def hard_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synth.SynthSummary]:
    """Three sites: one mixed (Dirichlet share), one all-normal, one all-lesion; tiny images."""
    out = tmp_path_factory.mktemp("hard") / "data"
    summary = synthesize(
        out, sites=3, images_per_site=10, site_sizes=[40, 20, 20], one_class_sites=2,
        label_alpha=1.0, test_prevalence=0.25, test_images=20, seed=0,
    )
    return out, summary


def test_sizes_one_class_sites_and_test_prevalence(
    hard_data: tuple[Path, synth.SynthSummary],
) -> None:
    out, summary = hard_data
    assert summary.images == {"hospital-01": 40, "hospital-02": 20, "hospital-03": 20}
    labels = {site: _labels(out / "sites" / site) for site in summary.sites}
    assert {site: len(rows) for site, rows in labels.items()} == summary.images
    # the last two sites hold one class each, normal then lesion; the first holds both
    assert set(labels["hospital-02"]) == {"0"} and summary.positives["hospital-02"] == 0.0
    assert set(labels["hospital-03"]) == {"1"} and summary.positives["hospital-03"] == 1.0
    assert set(labels["hospital-01"]) == {"0", "1"}
    test = _labels(out / "test")
    assert len(test) == 20 and test.count("1") == summary.test_positives == 5
    # a one-class site still has train and val rows (of its one class)
    with open(out / "sites" / "hospital-03" / "labels.csv", newline="") as f:
        splits = {row["split"] for row in csv.DictReader(f)}
    assert {"train", "val"} <= splits


def test_label_alpha_skews_mixed_sites_but_keeps_both_classes() -> None:
    layout = _hard_layout(8, None, 0, 0.05, None, 100)
    profiles = _site_profiles(8, 100, 0, layout)
    shares = [p.prevalence for p in profiles]
    # Beta(0.05, 0.05) puts nearly every site near 0 or 1 ...
    assert sum(min(s, 1 - s) < 0.05 for s in shares) >= 6, shares
    # ... and a mixed site keeps at least one image of each class however skewed
    for p in profiles:
        assert 0 < int(_site_labels(p, 0).sum()) < p.n_images
    spread = _site_profiles(8, 100, 0, _hard_layout(8, None, 0, 100.0, None, 100))
    assert all(0.3 < p.prevalence < 0.7 for p in spread)


def test_default_layout_is_unchanged() -> None:
    # the demo's layout (seed 0, 4 sites of ~200), as written before the hard-layout flags:
    # existing data sets and tests stay reproducible
    profiles = _site_profiles(4, 200, 0, _hard_layout(4, None, 0, None, None, 400))
    assert [p.n_images for p in profiles] == [127, 247, 191, 250]
    assert [round(p.prevalence, 6) for p in profiles] == [0.37961, 0.151859, 0.353993, 0.590185]
    assert [int(_site_labels(p, 0).sum()) for p in profiles] == [48, 38, 68, 148]
    assert _hard_layout(4, None, 0, None, None, 400).test_positives == 200
    assert _site_profiles(4, 200, 0) == profiles


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--sites", "3", "--site-sizes", "30,40"], "--site-sizes gives 2 sizes but --sites is 3"),
        (["--site-sizes", "30,5"], "--site-sizes must all be >= 10"),
        (["--site-sizes", "30,big"], "--site-sizes must be whole numbers"),
        (["--sites", "2", "--one-class-sites", "3"], "--one-class-sites must be between 0 and"),
        (["--sites", "1", "--one-class-sites", "1"], "--one-class-sites 1 with --sites 1"),
        (["--label-alpha", "0"], "--label-alpha must be > 0"),
        (["--test-prevalence", "1"], "--test-prevalence must be in (0, 1)"),
        (["--test-prevalence", "-0.2"], "--test-prevalence must be in (0, 1)"),
    ],
)
def test_bad_hard_flags_exit_2_naming_the_flag(tmp_path: Path, args: list[str], flag: str) -> None:
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    assert flag in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_site_sizes_alone_set_the_number_of_sites(tmp_path: Path) -> None:
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "out"), "--site-sizes",
                                 "12,10", "--test-images", "10", "--test-prevalence", "0.3"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out" / "sites").iterdir()) == [
        "hospital-01", "hospital-02"]
    assert "30% lesions" in result.output


@pytest.mark.slow  # end-to-end (Ray starts): still run by `make test`, i.e. in CI
def test_hard_scenario_runs_end_to_end(
    hard_data: tuple[Path, synth.SynthSummary], tmp_path: Path
) -> None:
    """simulations/scenarios/hard.toml through `medfed simulate`, at a CI size."""
    out, _ = hard_data
    run_dir = tmp_path / "run"
    result = runner.invoke(app, [
        "simulate", "--scenario", str(HARD), "--data", str(out / "sites"), "--test-data",
        str(out / "test"), "--out", str(run_dir), "--rounds", "2", "--image-size", "32",
        "--local-steps", "2", "--no-dp", "--metrics-port", "0",
    ])
    assert result.exit_code == 0, result.output
    results = json.loads((run_dir / "results.json").read_text())
    assert results["outcome"]["status"] == "trained", results["outcome"]
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    # every site trained, the one-class ones included
    assert sorted(results["rounds"][-1]["participants"]) == ["hospital-01", "hospital-02",
                                                            "hospital-03"]
    final = results["final"]
    assert final["source"] == "central" and np.isfinite(final["auc"])


def test_hard_scenario_parses_is_documented_and_matches_the_bench() -> None:
    from bench import hard
    from bench.figures import _synth_flags
    from simulations.scenario import Scenario

    scenario = Scenario.load(HARD)
    cfg = scenario.config()
    assert cfg.sites_dir == "data/hard/sites" and cfg.rounds == 20
    assert "hard.toml" in (HARD.parent / "README.md").read_text()
    # the synth command in the file's comment is the one `make bench` measures
    comment = " ".join(line.lstrip("#").strip().rstrip("\\").strip()
                       for line in HARD.read_text().splitlines() if line.startswith("#"))
    for flag in _synth_flags(hard.HARD_SYNTH).split(" --"):
        if not flag.startswith("-"):
            flag = "--" + flag
        if flag.startswith("--sites "):  # implied by --site-sizes in the comment
            continue
        assert flag in comment, flag
