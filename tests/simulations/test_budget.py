"""A site's privacy budget holds across runs: simulated sites keep ledgers as deployed ones do."""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.ledger import PrivacyLedger
from common.config import RunConfig
from common.privacy import REFUSAL_MARK, epsilon_of
from medfed.cli import app
from simulations.runner import simulate

pytestmark = pytest.mark.slow


def test_a_spent_budget_refuses_the_next_run_and_the_run_goes_on(easy_hospitals: Path,
                                                                  tmp_path: Path) -> None:
    ledgers = tmp_path / "ledgers"
    base = RunConfig(
        sites_dir=str(easy_hospitals / "sites"), test_data=str(easy_hospitals / "test"),
        rounds=2, local_steps=2, batch_size=32, image_size=32, target_epsilon=3.0,
        ledger_dir=str(ledgers),
    )
    first = simulate(base.replace(out=str(tmp_path / "run-1")))
    sites = sorted(first["privacy"])
    spent = {}
    for name in sites:
        # the site's worst image is a training image: its validation images only paid for the
        # class counts and score histograms (client.validation), a smaller epsilon
        spent[name] = PrivacyLedger(easy_hospitals / "sites" / name, ledgers).read().spent()
        ledger = PrivacyLedger(easy_hospitals / "sites" / name, ledgers, split="train").read()
        assert ledger.spent() == pytest.approx(spent[name])
        # the training images' epsilon is the accountant's over the run's steps (one run so far)
        (history,) = ledger.runs.values()
        assert spent[name] == pytest.approx(epsilon_of(history, delta=1e-5, accountant="rdp"))
        assert spent[name] == pytest.approx(first["privacy"][name]["epsilon"], rel=1e-6)

    # a new run, with a budget just above what the first one spent: the first round of the new
    # run would cross it at every site, which refuses; the aggregator records refusals
    budget = max(spent.values()) + 0.05
    second = simulate(base.replace(out=str(tmp_path / "run-2"), budget_epsilon=budget))
    for entry in second["rounds"]:
        assert entry["participants"] == []
        kinds = {(f["site"], f["stage"], f["kind"]) for f in entry["failures"]}
        assert {(s, "train", "refused") for s in sites} <= kinds
        assert all(REFUSAL_MARK in f["reason"] for f in entry["failures"]
                   if f["kind"] == "refused")
    for name in sites:  # nothing was spent by the refused run
        assert PrivacyLedger(easy_hospitals / "sites" / name, ledgers).read().spent() == (
            pytest.approx(spent[name])
        )

    shown = CliRunner().invoke(
        app, ["site", "budget", "--data", str(easy_hospitals / "sites" / sites[0]),
              "--ledger-dir", str(ledgers), "--json"],
        env={**os.environ},
    )
    assert shown.exit_code == 0, shown.output
    entry = json.loads(shown.output)
    assert entry["epsilon_spent"] == pytest.approx(spent[sites[0]])
    assert entry["budget_epsilon"] == pytest.approx(budget)
