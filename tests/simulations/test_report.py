import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.cli import EXIT_BAD_INPUT, app
from simulations.report import render_report, write_report
from simulations.report.data import (
    FAILED,
    REFUSED,
    SCREENED,
    TRAINED,
    bytes_by_site,
    epsilon_matrix,
    fairness_by_round,
    load_results,
    participation_matrix,
    site_names,
)
from simulations.report.failures import short_reason

runner = CliRunner()
SECTIONS = ["config", "global", "sites", "participation", "privacy", "fairness", "failures",
            "bytes"]
MODEL_BYTES = 76904


def make_results(
    sites: int = 4,
    rounds: int = 3,
    *,
    total_rounds: int | None = None,
    central: bool = True,
    dp: bool = True,
    budget: float = 0.0,
    failures: dict[int, list[dict[str, str]]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """A results.json in server/record.py's format, with chosen sites, rounds and failures."""
    rng = np.random.default_rng(seed)
    names = [f"site-{i:04d}" for i in range(sites)]
    failures = failures or {}
    entries = []
    for r in range(1, rounds + 1):
        failed = {f["site"] for f in failures.get(r, []) if f["stage"] == "train"}
        trained = [n for n in names if n not in failed]
        per_site = {
            n: {
                "train": {"train-loss": float(rng.uniform(0.2, 1.0)), "num-examples": 50.0,
                          "epsilon": 2.0 * r} if n in trained else None,
                "evaluate": {"auc": float(rng.uniform(0.4, 0.95)), "accuracy": 0.7,
                             "num-examples": 10.0},
            }
            for n in names
        }
        entries.append({
            "round": r,
            "central": {"auc": 0.6 + 0.05 * r, "accuracy": 0.6, "sensitivity": 0.5,
                        "specificity": 0.7, "loss": 0.6} if central else None,
            "federated": {"train": {"train-loss": 0.5}, "evaluate": {"auc": 0.7, "loss": 0.5},
                          "sites": per_site},
            "sampled": list(names),
            "participants": trained,
            "failures": failures.get(r, []),
            "duration_s": 1.5,
            "finished_at": time.time(),
            "sites_connected": sites,
            "privacy": {n: {"epsilon": 2.0 * r, "delta": 1e-5} for n in trained} if dp else {},
            "update_bytes": {
                n: {"down": 2 * MODEL_BYTES, "up": MODEL_BYTES if n in trained else 0}
                for n in names
            },
        })
    return {
        "config": {"rounds": total_rounds or rounds, "dp": dp, "target-epsilon": 8.0,
                   "delta": 1e-5, "budget-epsilon": budget, "model": "cnn", "image-size": 64,
                   "channels": 1, "num-classes": 2, "test-data": "/t" if central else "",
                   "run-key": "abc"},
        "started": "2026-01-01T00:00:00+0000",
        "initial": {"auc": 0.5} if central else None,
        "rounds": entries,
        "final": {"auc": 0.75, "source": "central"} if entries else {},
        "privacy": {n: {"dp": dp, "epsilon": 2.0 * rounds} for n in names},
        "artifacts": {},
    }


def write_run(folder: Path, results: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def sections(document: str) -> list[str]:
    return re.findall(r'<section id="([a-z]+)">', document)


MIXED_FAILURES = {
    2: [
        {"site": "site-0001", "stage": "train", "kind": "refused",
         "reason": "privacy budget of site-0001 would be exceeded"},
        {"site": "site-0002", "stage": "train", "kind": "screened_norm",
         "reason": "update norm z=9.1 > 3.5"},
        {"site": "site-0003", "stage": "train", "kind": "timeout",
         "reason": "no reply before the round timeout"},
        {"site": "site-0000", "stage": "evaluate", "kind": "error",
         "reason": "<script>alert(1)</script> evaluate failed"},
    ]
}


def test_report_has_every_section_and_is_self_contained() -> None:
    document = render_report(make_results(failures=MIXED_FAILURES))
    assert sections(document) == SECTIONS
    for title in ("Run configuration", "Global metrics per round", "Per-site metrics per round",
                  "Participation", "epsilon per site", "Fairness across hospitals", "Failures",
                  "Bytes per site"):
        assert title in document
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', document, re.I)
    assert "<script" not in document and "<link" not in document
    images = re.findall(r'<img [^>]*src="([^"]+)"', document)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert "finished: 3 of 3 rounds" in document


def test_failures_are_listed_with_kind_stage_and_escaped_reason() -> None:
    document = render_report(make_results(failures=MIXED_FAILURES))
    failures = document.split('<section id="failures">')[1].split("</section>")[0]
    for kind in ("refused", "screened_norm", "timeout", "error"):
        assert f"<td>{kind}</td>" in failures
    assert "privacy budget of site-0001 would be exceeded" in failures
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in failures
    assert "4 failed replies from 4 site(s)" in failures


def test_long_ray_reasons_keep_their_tail_without_terminal_colours() -> None:
    reason = "\x1b[36mray::ClientAppActor.run()\x1b[39m " + "traceback line " * 50 + (
        "Message: site-0748: simulated fault: dropout in round 2"
    )
    cell = short_reason(reason)
    assert "\x1b" not in cell
    shown = cell.split(">", 1)[1]
    assert shown.startswith("… ") and "dropout in round 2</span>" in shown
    assert len(shown) < 300
    assert short_reason("short <b>") == '<span title="short &lt;b&gt;">short &lt;b&gt;</span>'


def test_federation_size_counts_sites_never_sampled() -> None:
    results = make_results(sites=3)
    for entry in results["rounds"]:
        entry["sites_connected"] = 200
    document = render_report(results)
    assert "200 in the federation, 3 of them sampled at least once" in document


def test_zero_failures_says_so() -> None:
    document = render_report(make_results())
    assert "No failures in 3 rounds" in document


def test_participation_codes_follow_participants_and_training_failures() -> None:
    results = make_results(failures=MIXED_FAILURES)
    sites = site_names(results)
    grid = participation_matrix(results, sites)
    assert grid.shape == (4, 3)
    assert (grid[:, [0, 2]] == TRAINED).all()
    # an evaluate failure does not undo the site's training update
    assert [int(c) for c in grid[:, 1]] == [TRAINED, REFUSED, SCREENED, FAILED]


def test_fairness_is_worst_site_against_mean() -> None:
    results = make_results(sites=5, rounds=2)
    rows = fairness_by_round(results)
    for row, entry in zip(rows, results["rounds"], strict=True):
        aucs = {n: s["evaluate"]["auc"] for n, s in entry["federated"]["sites"].items()}
        assert row["worst"] == min(aucs.values())
        assert row["worst_site"] == min(aucs, key=aucs.__getitem__)
        assert row["mean"] == pytest.approx(np.mean(list(aucs.values())))
        assert row["gap"] == pytest.approx(row["mean"] - row["worst"])


def test_epsilon_is_carried_over_rounds_a_site_sits_out() -> None:
    results = make_results(failures={2: MIXED_FAILURES[2][:1]})
    eps = epsilon_matrix(results, site_names(results))
    assert list(eps[1]) == [2.0, 2.0, 6.0]  # site-0001 refused round 2
    assert list(eps[0]) == [2.0, 4.0, 6.0]


def test_bytes_per_site_counts_rounds_with_an_update() -> None:
    traffic = bytes_by_site(make_results(failures={2: MIXED_FAILURES[2][:1]}))
    assert traffic["site-0000"]["up_per_round"] == MODEL_BYTES
    assert traffic["site-0001"]["up"] == 2 * MODEL_BYTES
    assert traffic["site-0001"]["up_per_round"] == MODEL_BYTES
    assert traffic["site-0001"]["down"] == 6 * MODEL_BYTES


def test_bytes_section_compares_updates_with_the_float32_model() -> None:
    document = render_report(make_results())
    ratio = re.search(r"up per round / float32 model</td><td>([0-9.]+)", document)
    assert ratio is not None
    assert 0.95 < float(ratio.group(1)) < 1.05


@pytest.mark.parametrize("sites", [1000])
def test_many_sites_are_summarised_not_drawn_one_by_one(sites: int) -> None:
    failures = {
        3: [{"site": f"site-{i:04d}", "stage": "train", "kind": "error", "reason": "crash"}
            for i in range(0, sites, 7)]
    }
    started = time.perf_counter()
    document = render_report(make_results(sites=sites, rounds=5, failures=failures, budget=20))
    assert time.perf_counter() - started < 60
    assert sections(document) == SECTIONS
    assert "participation heatmap" in document
    assert 'class=cell' not in document  # no 1,000-row HTML grid
    assert "The 10 sites with the lowest last validation AUC" in document
    assert f"all {sites:,} sites" in document
    assert len(document) < 5_000_000


def test_no_central_test_data() -> None:
    document = render_report(make_results(central=False))
    assert sections(document) == SECTIONS
    assert "no central test data" in document


def test_run_in_progress_and_run_not_started() -> None:
    document = render_report(make_results(rounds=2, total_rounds=10))
    assert "in progress or stopped: 2 of 10 rounds recorded" in document
    assert sections(document) == SECTIONS
    empty = render_report(make_results(rounds=0, total_rounds=10))
    assert sections(empty) == ["config"]
    assert "No round has finished yet" in empty


def test_run_without_dp_says_there_is_no_guarantee() -> None:
    document = render_report(make_results(dp=False))
    assert "trained without DP-SGD" in document


def test_write_report_default_path_and_out(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", make_results())
    assert write_report(run) == run / "report.html"
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")
    other = tmp_path / "elsewhere.html"
    assert write_report(run, other) == other and other.is_file()


def test_cli_report_writes_the_file(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", make_results(failures=MIXED_FAILURES))
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.html").is_file()
    result = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0 and (tmp_path / "r.html").is_file()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p / "missing", "no such folder"),
        (lambda p: p, "not a run folder (no results.json)"),
        (lambda p: (p / "results.json").write_text('{"config": {}, "rou') and p,
         "not valid JSON"),
        (lambda p: (p / "results.json").write_text("[1, 2]") and p, "not a medfed results file"),
    ],
    ids=["missing", "not-a-run", "corrupt", "wrong-shape"],
)
def test_cli_report_bad_input_names_the_path_and_the_fix(tmp_path: Path, setup, message) -> None:
    target = setup(tmp_path)
    result = runner.invoke(app, ["report", str(target)])
    assert result.exit_code == EXIT_BAD_INPUT
    flat = " ".join(result.output.split())
    assert message in flat
    assert str(target) in flat.replace(" ", "") or str(target) in flat
    assert "Traceback" not in result.output


def test_load_results_rejects_a_malformed_round(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"config": {}, "rounds": [{"x": 1}]}))
    with pytest.raises(ValueError, match="round entry 0 is malformed"):
        load_results(tmp_path)


def test_cli_report_out_in_a_missing_folder(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", make_results())
    result = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "no" / "r.html")])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "does not exist" in result.output


@pytest.mark.slow
def test_simulate_writes_the_report(easy_hospitals: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["simulate", "--data", str(easy_hospitals / "sites"), "--out", str(out), "--rounds", "1",
         "--local-steps", "2", "--no-dp", "--metrics-port", "0", "--image-size", "32"],
    )
    assert result.exit_code == 0, result.output
    document = (out / "report.html").read_text()
    assert sections(document) == SECTIONS
    assert "finished: 1 of 1 rounds" in document
