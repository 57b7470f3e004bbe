"""Signed runs and the site run policy in a real deployed federation on 127.0.0.1.

Two hospitals with default kits (DP required, the provisioned operator trusted, the app
approved), `medfed server` and `medfed site` as README says. The operator's own `medfed run
--no-dp` is refused by both, a plain `flwr run` (unsigned) and a run whose config was changed
after signing are refused, and a normal signed DP run still trains.
"""

import json
import subprocess
import time
from collections.abc import Iterator

import pytest
import tomli_w

from bench.federation import Federation
from bench.federation import finish as _finish
from bench.federation import results as _results
from client.ledger import PrivacyLedger
from common.apps import build_app_bundle
from common.operator_kit import OperatorKit
from common.policy import RUN_REFUSAL_MARK
from server.submit import CONNECTION, flower_home, flwr_argv, run_status, sign_overrides
from tests.deploy.test_federation import provisioned

pytestmark = pytest.mark.slow

SITES = ["hospital-a", "hospital-b"]
# the smallest run that trains: one round, small images
# the closing cross-site evaluation is test_federation's; here it would be one more exchange
SMALL = ("--rounds", "1", "--min-sites", "2", "--image-size", "32", "--no-cross-site")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    with provisioned(
        tmp_path_factory.mktemp("policy"), project="policy", sites=SITES, images=24, test_images=4,
        seed=7, timeout=180,
    ) as fed:
        yield fed


def _spent(fed: Federation) -> dict[str, float]:
    return {name: PrivacyLedger(fed.data / "sites" / name).read().spent() for name in SITES}


def _audited_runs(fed: Federation) -> set[str]:
    runs = set()
    for name in SITES:
        trail = fed.root / name / "audit.jsonl"
        if trail.is_file():
            runs |= {str(json.loads(line)["run"]) for line in trail.read_text().splitlines()}
    return runs


def _assert_refused_by_every_site(results: dict, needle: str) -> None:
    (entry,) = results["rounds"]
    assert entry["participants"] == []
    refused = [f for f in entry["failures"] if f["kind"] == "refused"]
    assert sorted(f["site"] for f in refused if f["stage"] == "train") == SITES, entry["failures"]
    # with nothing to aggregate the aggregator notes that too; nothing else failed
    assert [f["stage"] for f in entry["failures"] if f["kind"] != "refused"] in ([], ["aggregate"])
    for failure in refused:
        assert failure["reason"].startswith(f"{RUN_REFUSAL_MARK}: site {failure['site']} ")
        assert needle in failure["reason"]
        assert "/" not in failure["reason"].split(";")[0]  # no path of the site


def test_the_operators_own_no_dp_run_trains_at_no_default_site(federation: Federation) -> None:
    spent = _spent(federation)
    code, _, stderr = _finish(federation.run("no-dp", *SMALL, "--no-dp"), timeout=400)
    assert code == 3, stderr[-3000:]
    assert "refused" in stderr and "without differential privacy" in stderr
    results = _results(federation.root / "no-dp")
    _assert_refused_by_every_site(results, "without differential privacy")
    assert "medfed site policy --kit KIT" in results["rounds"][0]["failures"][0]["reason"]
    assert _spent(federation) == spent
    assert _audited_runs(federation) == set()  # nothing left either hospital


def _flwr_run(fed: Federation, overrides: dict) -> int:
    """A run submitted with Flower's own CLI and the operator's connection; its run id."""
    kit = OperatorKit.load(fed.kits / "operator")
    with flower_home(kit) as env:
        config = fed.root / f"run-config-{time.monotonic_ns()}.toml"
        config.write_text(tomli_w.dumps(overrides))
        done = subprocess.run(
            # the operator's certificate gets past the gateway; the missing or wrong
            # signature is what each site must refuse
            flwr_argv("run", str(fed.app), CONNECTION, "--run-config", str(config),
                      "--format", "json"),
            env=env, capture_output=True, text=True, timeout=300,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    return int(json.loads(done.stdout[done.stdout.index("{"):])["run-id"])


def _server_results(fed: Federation, run_id: int, timeout: float = 400) -> dict:
    """The aggregator's results.json of a run, once Flower lists the run as finished."""
    kit = OperatorKit.load(fed.kits / "operator")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if str(run_status(kit, run_id).get("status", "")).startswith("finished"):
            return json.loads((fed.state / "runs" / str(run_id) / "results.json").read_text())
        time.sleep(3)
    pytest.fail(f"run {run_id} did not finish in {timeout}s:\n"
                + (fed.server.text()[-3000:] if fed.server else ""))


BASE = {"rounds": 1, "min-sites": 2, "image-size": 32, "batch-size": 16, "sites-dir": "",
        "test-data": "", "metrics-port": 0}


def test_unsigned_and_tampered_runs_are_refused(federation: Federation) -> None:
    spent = _spent(federation)
    unsigned = _flwr_run(federation, {**BASE, "dp": False})
    _assert_refused_by_every_site(_server_results(federation, unsigned), "not signed")

    kit = OperatorKit.load(federation.kits / "operator")
    fab_hash = build_app_bundle(federation.app)[1].sha256  # type: ignore[arg-type]
    signed = sign_overrides(kit, BASE, fab_sha256=fab_hash)
    tampered = _flwr_run(federation, {**signed, "target-epsilon": 1000.0})
    _assert_refused_by_every_site(
        _server_results(federation, tampered), "changed after the operator signed"
    )
    assert _spent(federation) == spent
    assert _audited_runs(federation) == set()


def test_a_signed_dp_run_still_trains(federation: Federation) -> None:
    code, _, stderr = _finish(federation.run("dp", *SMALL), timeout=400)
    assert code == 0, stderr[-3000:]
    results = _results(federation.root / "dp")
    (entry,) = results["rounds"]
    assert sorted(entry["participants"]) == SITES
    assert all(0 < p["epsilon"] <= 8.0 + 1e-6 for p in results["privacy"].values())
    assert all(v > 0 for v in _spent(federation).values())
