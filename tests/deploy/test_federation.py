"""A real deployed federation on 127.0.0.1: provisioned kits, `medfed server` (SuperLink with TLS
and SuperNode authentication, behind the gateway), three `medfed site` processes whose hospitals
approved the app, runs submitted with `medfed run` and the operator kit's certificate.

The tests share one federation and run in file order: a run over all sites, refusals of a
stranger's key and of a client without TLS, a site killed mid-run, and a server restart.
"""

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.federation import BIN, Federation
from bench.federation import finish as _finish
from bench.federation import provisioned as federation_on
from bench.federation import results as _results
from common.certs import SiteKeyPair, write_private, write_public
from common.procs import descendants, flower_environment, flower_orphans, terminate_tree
from tests.medfed.helpers import fetch, free_port, samples
from tests.simulations.conftest import write_easy_hospitals

pytestmark = pytest.mark.slow

SITES = ["hospital-a", "hospital-b", "hospital-c"]


@contextlib.contextmanager
def provisioned(
    root: Path, *, project: str, sites: list[str], images: int, test_images: int, seed: int,
    timeout: float,
) -> Iterator[Federation]:
    """bench.federation's federation on easy hospitals of `images` each (half positive)."""
    data = write_easy_hospitals(
        root / "data", [(name, images, 0.5) for name in sites], test_images=test_images,
        seed=seed,
    )
    with federation_on(root, project=project, data=data, sites=sites, timeout=timeout) as fed:
        yield fed


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    with provisioned(
        tmp_path_factory.mktemp("federation"), project="e2e", sites=SITES, images=60,
        test_images=20, seed=3, timeout=120,
    ) as fed:
        yield fed


def test_a_run_trains_on_every_site_over_tls(federation: Federation) -> None:
    code, stdout, stderr = _finish(federation.run("run-1", "--rounds", "2", "--min-sites", "3"))
    assert code == 0, stderr[-3000:]
    assert "medfed round 2/2" in stderr
    run_dir = federation.root / "run-1"
    results = _results(run_dir)
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for entry in results["rounds"]:
        assert sorted(entry["participants"]) == SITES
    assert sorted(results["privacy"]) == SITES
    assert all(0 < p["epsilon"] <= 8.0 + 1e-6 for p in results["privacy"].values())
    assert (run_dir / "model.pt").stat().st_size > 10_000
    server_copy = federation.state / "runs"
    (run_id,) = [p.name for p in server_copy.iterdir()]
    federation.runs.append(run_id)
    # the operator's files are the aggregator's, byte for byte
    assert (server_copy / run_id / "model.pt").read_bytes() == (run_dir / "model.pt").read_bytes()
    # the run's end: every hospital scored the final model on its own test split (results
    # .json `cross_site`), and the model card came back to the operator with the results
    cross = results["cross_site"]
    assert sorted(cross["sites"]) == SITES and cross["failed"] == {}
    assert {v["split"] for v in cross["sites"].values()} == {"test"}
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["sites"] == SITES
    assert card["performance"]["cross_site"]["sites"] == cross["sites"]
    assert ((server_copy / run_id / "model_card.html").read_bytes()
            == (run_dir / "model_card.html").read_bytes())
    for name in SITES:
        assert f"registered site {name}" in federation.server.text()  # type: ignore[union-attr]
    # each hospital signs its audit trail with its kit's key, and the trail holds every head
    # the aggregator recorded for it
    for name in SITES:
        assert sorted(results["rounds"][-1]["audit_heads"]) == SITES
        audit = subprocess.run(
            [str(BIN / "medfed"), "site", "audit", "--state", str(federation.root / name),
             "--verify", "--kit", str(federation.kits / "sites" / name),
             "--witness", str(run_dir / "results.json")],
            capture_output=True, text=True, timeout=120,
        )
        assert audit.returncode == 0, audit.stdout + audit.stderr
        # one per round, and the reply to the closing cross-site evaluation
        assert "the 3 heads the aggregator witnessed are in it" in " ".join(audit.stdout.split())
        assert not (federation.root / name / "audit.key").exists()

    # the aggregator's exporter follows deployed runs: rounds and each site's epsilon
    url = f"http://127.0.0.1:{federation.metrics_port}/metrics"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        values = samples(fetch(url))
        if values.get(("medfed_round", frozenset())) == 2.0:
            break
        time.sleep(1)
    assert values[("medfed_round", frozenset())] == 2.0
    for name, spent in results["privacy"].items():
        key = ("medfed_privacy_epsilon", frozenset({("site", name)}))
        assert values[key] == pytest.approx(spent["epsilon"])

    # each site exports its own progress: rounds it trained and the epsilon it spent
    for name, port in federation.site_metrics.items():
        site = samples(fetch(f"http://127.0.0.1:{port}/metrics"))
        labels = frozenset({("site", name), ("run", run_id)})
        assert site[("medfed_site_up", frozenset({("site", name)}))] == 1.0
        assert site[("medfed_site_rounds_trained_total", labels)] == 2.0
        assert site[("medfed_site_privacy_epsilon", labels)] == pytest.approx(
            results["privacy"][name]["epsilon"]
        )
        assert site[("medfed_site_privacy_budget_epsilon", labels)] == 8.0


def test_secure_aggregation_with_central_dp_runs_across_hospitals(federation: Federation) -> None:
    code, _, stderr = _finish(federation.run(
        "run-secagg", "--rounds", "1", "--min-sites", "3", "--secure-agg",
        "--central-dp", "client-fixed", "--central-noise", "0.5", "--clip-norm", "5",
        "--no-cross-site",  # run-1 and run-2 check the closing evaluation; one exchange less
    ))
    assert code == 0, stderr[-3000:]
    results = _results(federation.root / "run-secagg")
    (entry,) = results["rounds"]
    assert sorted(entry["participants"]) == SITES
    assert results["central_privacy"]["releases"] == 1
    assert results["central_privacy"]["sites_per_round"] == 3
    (run_id,) = [
        p.name for p in (federation.state / "runs").iterdir() if p.name not in federation.runs
    ]
    federation.runs.append(run_id)
    # what left each hospital for this run's training: SecAgg+ messages only, no plain update
    for name in SITES:
        trail = [
            json.loads(line)
            for line in (federation.root / name / "audit.jsonl").read_text().splitlines()
        ]
        sent = [e["message_type"] for e in trail if e["run"] == run_id]
        assert "train/secagg-collect_masked_vectors" in sent
        assert "train" not in sent
        assert all(e["arrays"] == [] for e in trail if e["run"] == run_id)


def test_a_stranger_with_a_self_made_key_is_refused(federation: Federation) -> None:
    kit = federation.root / "stranger-kit"
    kit.mkdir()
    for name in ("ca.crt", "medfed-kit.toml"):
        shutil.copy(federation.kits / "sites" / "hospital-a" / name, kit / name)
    pair = SiteKeyPair.generate("hospital-a")
    write_private(kit / "site.key", pair.private_openssh)
    write_public(kit / "site.pub", pair.public_openssh.encode())
    done = subprocess.run(
        [
            str(BIN / "medfed"), "site", "--kit", str(kit),
            "--data", str(federation.data / "sites" / "hospital-a"),
            "--state", str(federation.root / "stranger"), "--runtime-port", str(free_port()),
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "refuses site 'hospital-a'" in done.stderr
    assert "add-site" in done.stderr


def test_a_client_without_tls_is_refused(federation: Federation) -> None:
    # plain HTTP to the Fleet API: the gateway speaks only TLS and forwards nothing
    conn = http.client.HTTPConnection("127.0.0.1", federation.port, timeout=10)
    try:
        conn.request("POST", "/v1/fleet/activate-node", body=b"{}")
        response = conn.getresponse()
        assert response.status == 400
        assert b"plain HTTP request was sent to HTTPS port" in response.read()
    except (http.client.HTTPException, ConnectionError):
        pass
    finally:
        conn.close()
    # Flower's own SuperNode without TLS never gets a node id. (Its helper processes hold the
    # output open, hence a log file.)
    log = federation.root / "insecure-supernode.log"
    with log.open("w") as sink:
        node = subprocess.Popen(
            [
                str(BIN / "flower-supernode"), "--insecure",
                "--superlink", f"127.0.0.1:{federation.port}",
                "--max-retries", "2", "--max-wait-time", "20", "--port", str(free_port()),
            ],
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            env=flower_environment(),
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and node.poll() is None:
                if log.read_text().count("Connection attempt failed") >= 2:
                    break
                time.sleep(1)
        finally:
            terminate_tree(node)
    text = log.read_text()
    assert "SuperNode ID" not in text
    assert "Connection attempt failed" in text or node.returncode not in (None, 0), text[-2000:]


def test_a_run_completes_when_a_site_dies_mid_run(federation: Federation) -> None:
    run = federation.run("run-2", "--rounds", "3", "--min-sites", "2")
    runs_dir = federation.state / "runs"
    deadline = time.monotonic() + 300
    killed = False
    while time.monotonic() < deadline and run.poll() is None:
        new = [p for p in runs_dir.iterdir() if p.name not in federation.runs]
        if new and (new[0] / "results.json").is_file() and _results(new[0])["rounds"]:
            # the hospital's machine dies: every process of the site at once, no goodbye
            site = federation.sites["hospital-c"]
            tree = descendants(site.popen.pid)
            site.stop(signal.SIGKILL)
            for pid in tree + [p for t in tree for p in flower_orphans(t)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(1)
    assert killed, "round 1 never finished"
    code, _, stderr = _finish(run)
    assert code == 0, stderr[-3000:]
    results = _results(federation.root / "run-2")
    federation.runs.append(new[0].name)
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    assert sorted(results["rounds"][0]["participants"]) == SITES
    assert sorted(results["rounds"][-1]["participants"]) == ["hospital-a", "hospital-b"]
    # the dead hospital cannot score the final model: named, the run still succeeded
    assert sorted(results["cross_site"]["sites"]) == ["hospital-a", "hospital-b"]
    assert results["cross_site"]["failed"] == {
        "hospital-c": "no answer: not connected at the end of the run"}


def test_a_restarted_server_keeps_runs_and_sites(federation: Federation) -> None:
    assert federation.server is not None
    assert federation.server.stop() == 0
    restarted = federation.start_server("server-restarted.log")
    # registered nodes were kept: nothing to register again
    assert "registered site" not in restarted.text()
    listed = subprocess.run(
        [str(BIN / "medfed"), "runs", "--kit", str(federation.kits / "operator")],
        capture_output=True, text=True, timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    for run_id in federation.runs:
        assert run_id in listed.stdout
    # the surviving sites reconnect by themselves and train again
    code, _, stderr = _finish(federation.run(
        "run-3", "--rounds", "1", "--min-sites", "2", "--no-cross-site"))
    assert code == 0, stderr[-3000:]
    results = _results(federation.root / "run-3")
    assert sorted(results["rounds"][0]["participants"]) == ["hospital-a", "hospital-b"]
    # the operator turned the closing evaluation off: said, and no site was asked
    assert results["cross_site"]["skipped"].startswith("--no-cross-site")


def test_a_hospital_budget_holds_across_runs_and_restarts(federation: Federation) -> None:
    from client.ledger import PrivacyLedger

    data = federation.data / "sites" / "hospital-b"
    spent = PrivacyLedger(data).read().spent()  # every run so far trained on it
    assert spent > 0
    federation.sites["hospital-b"].stop()
    site = federation.start_site("hospital-b", "--budget-epsilon", f"{spent + 0.01:.4f}")
    site.wait_for("SuperNode ID", timeout=120)
    assert f"epsilon {spent:.3f} of" in site.text()  # the restarted site reads its ledger
    code, _, stderr = _finish(federation.run("run-4", "--rounds", "1", "--min-sites", "1",
                                              "--no-cross-site"))
    assert code == 0, stderr[-3000:]
    (entry,) = _results(federation.root / "run-4")["rounds"]
    assert entry["participants"] == ["hospital-a"]
    refused = [f for f in entry["failures"] if f["kind"] == "refused"]
    assert [(f["site"], f["stage"]) for f in refused] == [("hospital-b", "train")]
    assert "privacy budget refused: site hospital-b" in refused[0]["reason"]
    assert PrivacyLedger(data).read().spent() == pytest.approx(spent)
