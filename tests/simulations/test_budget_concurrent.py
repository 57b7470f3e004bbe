"""Two real `medfed simulate` runs at once never take a site past its budget; a run without DP
leaves unbounded spend on the ledger (issue 18: 12.17 spent of a budget of 10, and 0 for no DP)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client.ledger import PrivacyLedger
from tests.simulations.conftest import write_easy_hospitals

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _simulate(data: Path, out: Path, ledgers: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEDFED_LEDGER_DIR": str(ledgers)}
    return subprocess.Popen(
        [sys.executable, "-m", "medfed", "simulate", "--data", str(data / "sites"),
         "--test-data", str(data / "test"), "--out", str(out), "--rounds", "1",
         "--local-steps", "2",
         "--min-sites", "1", "--image-size", "32", "--batch-size", "16", "--seed", "0",
         "--metrics-port", "0",
         *flags],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_two_concurrent_runs_keep_the_site_within_its_budget(tmp_path: Path) -> None:
    data = write_easy_hospitals(tmp_path / "data", [("site-a", 40, 0.5)], 20, seed=3)
    ledgers = tmp_path / "ledgers"
    runs = [
        _simulate(data, tmp_path / f"run-{i}", ledgers, "--target-epsilon", "8",
                  "--budget-epsilon", "10")
        for i in (1, 2)
    ]
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    trained = []
    for i, output in enumerate(outputs, start=1):
        assert (tmp_path / f"run-{i}" / "results.json").is_file(), output[-3000:]
        results = json.loads((tmp_path / f"run-{i}" / "results.json").read_text())
        (entry,) = results["rounds"]
        trained += entry["participants"]
        if not entry["participants"]:
            at_site = [(f["site"], f["kind"]) for f in entry["failures"] if f["stage"] == "train"]
            assert at_site == [("site-a", "refused")], output[-3000:]
    spent = PrivacyLedger(data / "sites" / "site-a", ledgers).read().spent()
    assert trained == ["site-a"], "exactly one of the two runs trains the site"
    assert 0 < spent <= 10


def test_a_run_without_dp_is_recorded_as_unbounded(tmp_path: Path) -> None:
    data = write_easy_hospitals(tmp_path / "data", [("site-a", 30, 0.5)], 20, seed=4)
    ledgers = tmp_path / "ledgers"
    run = _simulate(data, tmp_path / "run", ledgers, "--no-dp")
    output = run.communicate(timeout=900)[0]
    assert run.returncode == 0, output[-3000:]
    assert math.isinf(PrivacyLedger(data / "sites" / "site-a", ledgers).read().spent())
    # a budgeted run on the same images (a copy, even) is refused
    shown = subprocess.run(
        [sys.executable, "-m", "medfed", "site", "budget", "--data",
         str(data / "sites" / "site-a"), "--ledger-dir", str(ledgers), "--json"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True,
    )
    assert json.loads(shown.stdout)["epsilon_spent"] == "inf"
