"""The model card: every site of results.json, its numbers, limitations drawn from the data."""

import json
import re
from pathlib import Path
from typing import Any

import pytest

from common.config import RunConfig
from server.cross_site import cross_site, summarize
from server.federation import RoundLog
from server.model_card import CARD_HTML, CARD_JSON, collect, render, write_model_card
from server.record import RunRecord
from simulations.report import MODEL_CARD, write_report

SCRIPT = "<script>alert('x')</script>"


def _run(tmp_path: Path, *, dp: bool = True, central: bool = True,
         sites: dict[str, dict[str, Any]] | None = None) -> RunRecord:
    """A finished 1-round run: a, b and c trained; d failed to train; e failed cross-site."""
    cfg = RunConfig(rounds=1, out=str(tmp_path), image_size=32, dp=dp, run_key="card-test")
    record = RunRecord(tmp_path, cfg)
    privacy = {name: {"epsilon": 1.5 + i, "target_epsilon": 8.0, "delta": 1e-5,
                      "noise_multiplier": 1.1, "sample_rate": 0.25, "steps": 4 + i,
                      "accountant": "rdp", "max_grad_norm": 1.0}
               for i, name in enumerate(["a", "b", SCRIPT])} if dp else {}
    log = RoundLog(
        round=1,
        train={n: {"num-examples": 40.0 + i, "train-loss": 0.5} for i, n in
               enumerate(["a", "b", SCRIPT])},
        evaluate={n: {"num-examples": 10.0 + i, "auc": 0.7, "loss": 0.6} for i, n in
                  enumerate(["a", "b", SCRIPT])},
        privacy=privacy,
        failures=[{"site": "d", "stage": "train", "kind": "error", "reason": "disk full"}],
    )
    log.train_aggregated = {"train-loss": 0.5}
    log.evaluate_aggregated = {"auc": 0.7, "loss": 0.6, "num-examples": 33.0}
    central_metrics = {"auc": 0.81, "accuracy": 0.75, "ece": 0.04, "brier": 0.17,
                       "loss": 0.52, "num-examples": 200.0} if central else None
    record.add_round(log, central_metrics)
    per_site = sites or {
        "a": {"auc": 0.9, "loss": 0.4, "ece": 0.05, "num-examples": 50, "split": "test"},
        "b": {"auc": 0.88, "loss": 0.45, "ece": 0.06, "num-examples": 12, "split": "val"},
        SCRIPT: {"auc": 0.6, "loss": 0.9, "ece": 0.2, "num-examples": 40, "split": "test"},
    }
    record.cross_site = {"model": "final", "models": ["final"], "round": 1,
                         "requested_split": "test", "sites": per_site,
                         "summary": summarize(per_site),
                         "failed": {"e": "site e: evaluate failed (OSError)"}}
    record.write_results()
    return record


def _results(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "results.json").read_text())


def test_the_card_lists_every_site_and_its_numbers_equal_results_json(tmp_path: Path):
    _run(tmp_path)
    json_path, html_path = write_model_card(tmp_path)
    assert (json_path.name, html_path.name) == (CARD_JSON, CARD_HTML)
    results = _results(tmp_path)
    card = json.loads(json_path.read_text())
    # d failed to train, e only failed the cross-site evaluation: both are sites of the run
    assert card["sites"] == sorted(["a", "b", SCRIPT, "d", "e"])
    assert set(card["data"]["sites"]) == set(card["sites"])
    perf = card["performance"]
    assert perf["cross_site"]["sites"] == results["cross_site"]["sites"]
    assert perf["cross_site"]["summary"] == results["cross_site"]["summary"]
    assert perf["cross_site"]["failed"] == results["cross_site"]["failed"]
    assert perf["worst_site"] == {"metric": "auc", "site": SCRIPT, "value": 0.6}
    assert perf["calibration"] == {"ece": 0.04, "brier": 0.17}
    assert perf["source"] == "central"
    assert card["training"]["privacy"]["sites"] == results["privacy"]
    assert card["training"]["network"]["args"] == RunConfig(image_size=32).network_args()
    for site in ["a", "b", SCRIPT]:
        facts = card["data"]["sites"][site]
        entry = results["rounds"][0]["federated"]["sites"][site]
        assert facts["train_examples"] == entry["train"]["num-examples"]
        assert facts["val_examples"] == entry["evaluate"]["num-examples"]
        assert facts["cross_site_examples"] == results["cross_site"]["sites"][site]["num-examples"]
        assert facts["cross_site_split"] == results["cross_site"]["sites"][site]["split"]

    page = html_path.read_text()
    for site in ["a", "b", "d", "e"]:
        assert f"<td>{site}</td>" in page
    for site, values in results["cross_site"]["sites"].items():
        for metric in ("auc", "loss", "ece"):
            assert f"<td>{values[metric]:.4g}</td>" in page, (site, metric)
    for site, spend in results["privacy"].items():
        assert f"<td>{spend['epsilon']:.4g}</td>" in page, site


def test_the_html_escapes_every_string_and_loads_nothing_from_outside(tmp_path: Path):
    _run(tmp_path)
    _, html_path = write_model_card(tmp_path)
    page = html_path.read_text()
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    # self-contained: no link, image, script or stylesheet fetched from anywhere
    assert not re.search(r"""(src|href)\s*=|https?://|@import|url\(""", page)


def test_limitations_are_drawn_from_the_data(tmp_path: Path):
    _run(tmp_path, dp=False, central=False)
    card = collect(_results(tmp_path), tmp_path)
    limits = "\n".join(card["limitations"])
    assert "without differential privacy" in limits
    assert "no central test set" in limits
    assert "Site e did not evaluate the final model" in limits
    assert "Site b has no test split" in limits
    # the script site's AUC 0.6 is 0.193 below the mean 0.793; a and b are above it
    assert f"At site {SCRIPT} the auc is 0.600" in limits
    assert "At site a " not in limits and "At site b " not in limits
    # b scored 12 images: too few to lean on
    assert "Site b evaluated the final model on 12 images only" in limits
    assert "Site a evaluated" not in limits


def test_a_dp_run_with_a_central_test_set_has_fewer_limitations(tmp_path: Path):
    sites = {name: {"auc": 0.85, "loss": 0.4, "num-examples": 60, "split": "test"}
             for name in ("a", "b", SCRIPT)}
    _run(tmp_path, sites=sites)
    card = collect(_results(tmp_path), tmp_path)
    limits = "\n".join(card["limitations"])
    assert "differential privacy" not in limits and "central test set" not in limits
    assert "below the mean" not in limits and "images only" not in limits
    assert "Site e did not evaluate" in limits  # still unknown there


def test_class_counts_are_read_from_the_site_folders_a_simulation_can_read(tmp_path: Path):
    sites_dir = tmp_path / "sites"
    (sites_dir / "a").mkdir(parents=True)
    rows = ["path,label,split"] + [f"img{i}.dcm,{i % 2},{'train' if i < 40 else 'test'}"
                                   for i in range(50)]
    (sites_dir / "a" / "labels.csv").write_text("\n".join(rows) + "\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = _run(run_dir)
    results = record.to_dict()
    results["config"]["sites-dir"] = str(sites_dir)
    card = collect(results, run_dir)
    assert card["data"]["sites"]["a"]["classes_per_split"] == {
        "train": {"0": 20, "1": 20}, "val": {}, "test": {"0": 5, "1": 5}}
    assert card["data"]["sites"]["b"]["classes_per_split"] is None  # no folder here
    limits = "\n".join(card["limitations"])
    assert "Site a holds fewer than 30 images of some classes (train class 0: 20, class 1: 20; " \
        "test class 0: 5, class 1: 5)" in limits
    assert "class 0: 20, class 1: 20" in render(card)


def test_cross_site_is_skipped_with_its_reason_when_no_round_trained(tmp_path: Path):
    cfg = RunConfig(rounds=1, out=str(tmp_path), image_size=32)
    record = RunRecord(tmp_path, cfg)
    record.add_round(RoundLog(round=1, failures=[
        {"site": "a", "stage": "train", "kind": "refused", "reason": "budget"}]), None)
    record.finish({})
    assert not record.trained
    # no site is asked: there is no final model to send (the grid is never touched)
    section = cross_site(None, cfg, record)  # type: ignore[arg-type]
    assert section["skipped"].startswith("no round trained a site")
    assert "sites" not in section
    record.cross_site = section
    record.write_results()
    card = collect(_results(tmp_path), tmp_path)
    assert card["sites"] == ["a"]
    assert any("not evaluated across sites: no round trained" in s for s in card["limitations"])
    assert any(s.startswith("The run trained no round") for s in card["limitations"])
    render(card)  # renders without a trained model's metrics


def test_the_report_links_the_card_relative_to_where_it_is_written(tmp_path: Path):
    assert MODEL_CARD == CARD_HTML
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _run(run_dir)
    page = write_report(run_dir).read_text()
    assert "model card" not in page  # no card yet: no dead link
    write_model_card(run_dir)
    assert f'<a href="{CARD_HTML}">model card</a>' in write_report(run_dir).read_text()
    elsewhere = tmp_path / "reports" / "my run.html"
    elsewhere.parent.mkdir()
    page = write_report(run_dir, elsewhere).read_text()
    assert f'<a href="../run/{CARD_HTML}">model card</a>' in page


@pytest.mark.parametrize("content", ["[1, 2]", "{not json"])
def test_a_results_file_that_is_no_run_is_named(tmp_path: Path, content: str):
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(ValueError, match="results.json: no model card can be written"):
        write_model_card(tmp_path)
