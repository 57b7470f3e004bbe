"""Fault injection: decided by the seed, injected by a client mod, reported by the aggregator."""

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord

from common.config import RunConfig
from common.evaluation import evaluation_message_after
from simulations.faults import FaultPlan, FaultSpec, flip_labels, read_fault_log, tamper
from simulations.partition import site_name
from simulations.runner import simulate
from simulations.scenario import DataSpec, Federation
from simulations.sites import simulated_sites
from tests.simulations.conftest import write_easy_site

NAMES = [site_name(i) for i in range(200)]


def _failing(plan: FaultPlan, rounds: int = 5) -> list[dict[str, str]]:
    return [plan.faults_in_round(r, NAMES) for r in range(1, rounds + 1)]


def test_same_seed_fails_the_same_sites_in_the_same_rounds():
    spec = FaultSpec(dropout=0.1, straggler=0.05, misbehave_fraction=0.2)
    a = spec.plan(NAMES, seed=3, round_timeout=60)
    b = spec.plan(NAMES, seed=3, round_timeout=60)
    c = spec.plan(NAMES, seed=4, round_timeout=60)
    assert _failing(a) == _failing(b) and a.misbehaving == b.misbehaving
    assert _failing(a) != _failing(c) and a.misbehaving != c.misbehaving
    # the rates are what the scenario asked for, and rounds differ from one another
    drops = [sum(v == "dropout" for v in r.values()) for r in _failing(a, 40)]
    assert 0.07 < np.mean(drops) / len(NAMES) < 0.13
    assert len({tuple(sorted(r)) for r in _failing(a)}) == 5
    # 20% misbehave, kinds handed out in turn
    kinds = list(a.misbehaving.values())
    assert len(kinds) == 40 and kinds.count("scale") == kinds.count("sign_flip") == 20
    assert a.straggler_delay == 65  # default: past the round timeout


def test_tampered_updates_follow_the_documented_formulas():
    start = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    local = {"w": np.full((2, 3), 1.5, np.float32), "b": np.full(3, -1.0, np.float32)}
    sent, reply = ArrayRecord([start["w"], start["b"]]), ArrayRecord([local["w"], local["b"]])
    plan = FaultPlan(scale=10, sign_flip=4)
    keys = list(reply.keys())
    scaled = tamper(sent, reply, "scale", plan)
    flipped = tamper(sent, reply, "sign_flip", plan)
    broken = tamper(sent, reply, "nan", plan)
    assert list(scaled.keys()) == keys
    np.testing.assert_allclose(scaled[keys[0]].numpy(), 1 + 10 * 0.5)
    np.testing.assert_allclose(scaled[keys[1]].numpy(), -10.0)
    np.testing.assert_allclose(flipped[keys[0]].numpy(), 1 - 4 * 0.5)
    np.testing.assert_allclose(flipped[keys[1]].numpy(), 4.0)
    assert all(np.isnan(broken[k].numpy()).all() for k in keys)
    assert flip_labels(np.array([0, 1, -1, 1]), 2).tolist() == [1, 0, -1, 0]


@pytest.mark.slow
def test_injected_faults_reach_results_json_with_site_and_reason(tmp_path: Path):
    pool = tmp_path / "pool"
    write_easy_site(pool, 120, 0.5, np.random.default_rng(1))
    federation = Federation(
        sites=6,
        data=DataSpec(path=str(pool), partition="iid"),
        faults=FaultSpec(
            dropout=0.3, misbehave_sites={"site-0002": "nan", "site-0005": "label_flip"}
        ),
    )
    cfg = RunConfig(
        sites_dir=str(pool), out=str(tmp_path / "run"), rounds=2, local_steps=2, dp=False,
        image_size=16, batch_size=16, seed=5, min_sites=1,
    )
    results = simulate(cfg, federation=federation)
    plan = simulated_sites(cfg, federation, tmp_path / "run").plan
    names = [site_name(i) for i in range(6)]
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    dropped_any = False
    for entry in results["rounds"]:
        expected = {s for s, f in plan.faults_in_round(entry["round"], names).items()}
        dropped_any |= bool(expected)
        failed = {(f["site"], f["stage"]) for f in entry["failures"] if "dropout" in f["reason"]}
        # every dropped site failed each message of the round, by name, and no one else did:
        # training, and the evaluation message that follows the last round
        stages = ("train", "evaluate") if evaluation_message_after(
            entry["round"], every=cfg.evaluate_every, last=cfg.rounds) else ("train",)
        assert failed == {(s, stage) for s in expected for stage in stages}
        for f in entry["failures"]:
            if "dropout" in f["reason"]:
                assert f"site {f['site']}: simulated fault: dropout in round {entry['round']}" in (
                    f["reason"]
                )
        # the NaN update is screened out whenever site-0002 took part
        nan_site = {f["site"] for f in entry["failures"] if f["kind"] == "screened_nan"}
        assert nan_site == ({"site-0002"} - expected)
        assert "site-0002" not in entry["participants"]
    assert dropped_any, "seed 5 drops at least one site in two rounds"
    log = read_fault_log(tmp_path / "run")
    assert {e["fault"] for e in log} >= {"dropout", "nan"}
    assert json.loads((tmp_path / "run" / "scenario.json").read_text())["sites"] == 6
