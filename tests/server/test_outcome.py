"""results.json's `outcome`: judged by the last round; a model no round trained is not written."""

from pathlib import Path

import numpy as np
import pytest

from common.config import RunConfig
from medfed.console import print_results
from server.record import RunRecord


def _round(n: int, participants: list[str], failures: list[dict]) -> dict:
    return {"round": n, "participants": participants, "failures": failures, "central": None,
            "federated": {"train": {}, "evaluate": {"auc": 0.7}, "sites": {}}}


def _refused(site: str) -> dict:
    return {"site": site, "stage": "train", "kind": "refused",
            "reason": f"privacy budget refused: site {site} has spent epsilon 1.0 ..."}


def _error(site: str) -> dict:
    return {"site": site, "stage": "train", "kind": "error",
            "reason": f"site {site}: train failed (ValueError: label 7)"}


AGGREGATE = {"site": "*", "stage": "aggregate", "kind": "error",
             "reason": "no update could be aggregated"}


def _record(tmp_path: Path, *rounds: dict) -> RunRecord:
    rec = RunRecord(tmp_path, RunConfig(out=str(tmp_path)))
    rec.rounds = list(rounds)
    return rec


@pytest.mark.parametrize(
    ("failures", "status", "code"),
    [
        ([_refused("a"), _refused("b"), AGGREGATE], "refused", 3),
        ([_refused("a"), _error("b"), AGGREGATE], "failed", 1),
        ([{**_error("a"), "kind": "screened_nan"}, AGGREGATE], "failed", 1),
        ([{**_error("a"), "kind": "timeout"}], "failed", 1),
        ([], "failed", 1),
    ],
)
def test_a_last_round_that_trained_no_site(tmp_path, failures, status, code) -> None:
    rec = _record(tmp_path, _round(1, [], failures))
    outcome = rec.outcome()
    assert (outcome["status"], outcome["exit_code"], outcome["trained"]) == (status, code, False)
    assert "*" not in outcome["sites"]
    assert rec.final_metrics() == {"trained": False}
    rec.finish({"w": np.zeros(2, dtype=np.float32)})
    assert not (tmp_path / "model.pt").exists()
    assert (tmp_path / "results.json").is_file()
    assert print_results(rec.to_dict(), tmp_path) == code


def test_earlier_rounds_trained_the_model_but_the_last_was_refused(tmp_path: Path) -> None:
    rec = _record(
        tmp_path, *(_round(n, ["a", "b"], []) for n in (1, 2, 3)),
        _round(4, [], [_refused("a"), _refused("b"), AGGREGATE]),
    )
    outcome = rec.outcome()
    assert outcome["status"] == "refused" and outcome["exit_code"] == 3
    assert outcome["trained"] is True and outcome["last_trained_round"] == 3
    assert rec.final_metrics()["trained"] is True
    rec.finish({"w": np.zeros(2, dtype=np.float32)})
    assert (tmp_path / "model.pt").is_file()


def test_a_round_with_one_site_trained_is_trained(tmp_path: Path) -> None:
    rec = _record(tmp_path, _round(1, ["a"], [_error("b")]))
    assert rec.outcome()["status"] == "trained" and rec.outcome()["exit_code"] == 0
    assert rec.outcome()["sites"] == {"b": {"kind": "error", "reason": _error("b")["reason"]}}
