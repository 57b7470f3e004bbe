"""The cross-site matrix: the final model at every site on its own test split, at the run's end."""

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.simulation import run_simulation

from client.app import make_client_app
from client.audit_state import TRAIL
from common.config import RunConfig
from common.cross_site import SPLIT_KEY
from common.operating import HIST_KEYS
from common.sites import site_refs
from server.app import make_server_app
from server.cross_site import read_replies, summarize
from simulations.runner import resume_config, simulate
from tests.simulations.conftest import write_easy_site

SITES = [("site-a", 30, 0.5), ("site-b", 25, 0.5), ("site-c", 25, 0.5)]


def _no_test_rows(site: Path) -> None:
    """Move a site's test rows to its training split: it keeps no held-out test set."""
    labels = site / "labels.csv"
    labels.write_text(labels.read_text().replace(",test\n", ",train\n"))


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cross") / "sites"
    rng = np.random.default_rng(5)
    for name, n, prevalence in SITES:
        write_easy_site(root / name, n, prevalence, rng)
    _no_test_rows(root / "site-b")
    return root


def _cfg(sites: Path, out: Path, **changes: Any) -> RunConfig:
    values: dict[str, Any] = dict(
        sites_dir=str(sites), out=str(out), rounds=1, local_steps=2, batch_size=8,
        image_size=32, seed=0, min_sites=3,
    )
    values.update(changes)
    return RunConfig(**values)


# --- the summary on hand-made numbers ------------------------------------------------------------


def test_summary_worst_is_the_min_of_a_score_and_the_max_of_an_error():
    sites = {
        "a": {"auc": 0.9, "loss": 0.3, "hd95": 2.0, "d-accuracy": 0.5, "num-examples": 10,
              "split": "test"},
        "b": {"auc": 0.6, "loss": 0.7, "hd95": 5.0, "d-accuracy": 0.9, "num-examples": 20,
              "split": "test"},
        "c": {"auc": math.nan, "loss": 0.5, "hd95": 3.0, "d-accuracy": 0.7, "num-examples": 5,
              "split": "val"},
    }
    summary = summarize(sites)
    # the NaN AUC is left out: worst, mean and spread over a and b
    assert summary["auc"] == {"worst": 0.6, "worst_site": "b", "mean": pytest.approx(0.75),
                              "spread": pytest.approx(0.3), "sites": 2}
    assert summary["loss"]["worst"] == 0.7 and summary["loss"]["worst_site"] == "b"
    assert summary["loss"]["mean"] == pytest.approx(0.5)
    assert summary["loss"]["spread"] == pytest.approx(0.4)
    assert summary["hd95"]["worst_site"] == "b" and summary["hd95"]["worst"] == 5.0
    # a GAN discriminator's accuracy has no better direction: mean and spread, no worst
    assert "worst" not in summary["d-accuracy"]
    assert summary["d-accuracy"]["spread"] == pytest.approx(0.4)
    # counts and the split are facts of a site, not metrics
    assert "num-examples" not in summary and "split" not in summary


def test_summary_of_a_metric_no_site_defines_is_absent():
    assert summarize({"a": {"auc": math.nan}, "b": {"auc": math.nan}}) == {}


def _asked(node: int) -> Message:
    return Message(RecordDict({}), dst_node_id=node, message_type=MessageType.EVALUATE)


def test_replies_become_sites_and_failures_with_their_reasons():
    metrics = MetricRecord({"auc": 0.8, "loss": 0.4, "num-examples": 12})
    ok = Message(RecordDict({"metrics": metrics, "site": ConfigRecord({"name": "a"}),
                             "evaluation": ConfigRecord({"split": "test"})}),
                 reply_to=_asked(1))
    # Flower wraps a site's exception in its own text; the site's part is kept
    broken = Message(Error(0, "ClientAppException: <class 'client.app.SiteFailure'>:<'site b: "
                              "evaluate failed (OSError)'>"), reply_to=_asked(2))
    refused = Message(Error(0, "privacy budget refused: site c has spent epsilon 8 of 8"),
                      reply_to=_asked(3))
    got = read_replies([ok, broken, refused], [1, 2, 3, 4], seen=["a", "b", "c", "d"])
    sites, failed = got.sites, got.failed
    assert sites == {"a": {"auc": 0.8, "loss": 0.4, "num-examples": 12, "split": "test"}}
    assert failed["b"] == "site b: evaluate failed (OSError)"
    assert failed["c"].startswith("refused: privacy budget refused: site c")
    # node 4 never answered; d, seen in the rounds, is not named by any reply
    assert failed["node-4"] == "no reply before the round timeout"
    assert failed["d"].startswith("no answer: not connected at the end of the run, or one of "
                                  "node-4")
    assert set(failed) == {"b", "c", "node-4", "d"}


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_site_scores_the_final_model_on_its_test_split_and_resume_redoes_it(
    sites: Path, tmp_path: Path
):
    run_dir = tmp_path / "run"
    results = simulate(_cfg(sites, run_dir))
    assert results["outcome"]["status"] == "trained"
    cross = results["cross_site"]
    assert cross["model"] == "final" and cross["models"] == ["final"]
    assert cross["round"] == 1
    assert sorted(cross["sites"]) == ["site-a", "site-b", "site-c"]
    assert cross["failed"] == {}
    # site-b keeps no test rows: it scored its validation split and says so
    assert cross["sites"]["site-a"]["split"] == "test"
    assert cross["sites"]["site-c"]["split"] == "test"
    assert cross["sites"]["site-b"]["split"] == "val"
    # write_easy_site: every 5th image is a test image, every 5th (offset 3) a validation one
    assert cross["sites"]["site-a"]["num-examples"] == 6
    assert cross["sites"]["site-c"]["num-examples"] == 5
    val_b = results["rounds"][-1]["federated"]["sites"]["site-b"]["evaluate"]["num-examples"]
    assert cross["sites"]["site-b"]["num-examples"] == val_b == 5
    for values in cross["sites"].values():
        assert {"auc", "loss", "sensitivity", "specificity"} <= set(values)
    aucs = {s: v["auc"] for s, v in cross["sites"].items()}
    finite = {s: a for s, a in aucs.items() if a is not None}
    assert cross["summary"]["auc"]["worst"] == min(finite.values())
    assert cross["summary"]["auc"]["worst_site"] == min(finite, key=finite.__getitem__)
    assert cross["summary"]["loss"]["worst"] == max(v["loss"] for v in cross["sites"].values())

    # what left each site: the cross-site reply is its trail's last entry, with the split it
    # scored and no score histogram (no release beyond the rounds' own)
    for site, split in [("site-a", "test"), ("site-b", "val")]:
        trail = (run_dir / "site-state" / site / TRAIL).read_text().splitlines()
        last = json.loads(trail[-1])
        assert last["message_type"] == "evaluate"
        assert last["configs"]["evaluation"] == {"split": split}
        assert not set(HIST_KEYS) & set(last["metrics"])

    # the model card beside it names every site with results.json's numbers
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["sites"] == ["site-a", "site-b", "site-c"]
    assert card["performance"]["cross_site"]["sites"] == cross["sites"]
    assert card["training"]["privacy"]["sites"] == results["privacy"]
    assert "site-b" in (run_dir / "model_card.html").read_text()

    # a resumed run evaluates its new final model again at its end
    resumed = simulate(resume_config(run_dir, {"rounds": 2}), resume=True)
    assert resumed["cross_site"]["round"] == 2
    assert sorted(resumed["cross_site"]["sites"]) == ["site-a", "site-b", "site-c"]
    assert (run_dir / "model_card.json").is_file()


def _fail_cross_site_at(site: str) -> Any:
    """A site whose disk fails when the run's end asks it for its test split."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        config = msg.content.config_records.get("config")
        asked = config is not None and SPLIT_KEY in config
        if msg.metadata.message_type == MessageType.EVALUATE and asked:
            names = ["site-a", "site-b", "site-c"]
            if names[int(context.node_config["partition-id"])] == site:
                raise OSError(f"site {site}: the test images' disk is unreadable")
        return call_next(msg, context)

    return mod


@pytest.mark.slow
def test_a_site_failing_the_cross_site_evaluation_is_listed_and_the_run_still_trained(
    sites: Path, tmp_path: Path
):
    cfg = _cfg(sites, tmp_path / "run", dp=False, run_key="cross-fail")
    refs = site_refs(sites, tmp_path / "run" / "site-state")
    assert [r.name for r in refs] == ["site-a", "site-b", "site-c"]
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=make_server_app(cfg, site_dirs=[r.data_dir for r in refs]),
        client_app=make_client_app(refs, outer_mods=[_fail_cross_site_at("site-c")]),
        num_supernodes=len(refs),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                          "logging_level": logging.ERROR, "log_to_driver": False},
        },
    )
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["outcome"]["status"] == "trained"
    assert results["outcome"]["exit_code"] == 0
    cross = results["cross_site"]
    assert sorted(cross["sites"]) == ["site-a", "site-b"]
    assert list(cross["failed"]) == ["site-c"]
    assert "disk is unreadable" in cross["failed"]["site-c"]
    assert set(cross["summary"]["loss"]) >= {"worst", "mean", "spread", "worst_site"}
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    assert card["sites"] == ["site-a", "site-b", "site-c"]
    assert any("site-c did not evaluate" in line for line in card["limitations"])
