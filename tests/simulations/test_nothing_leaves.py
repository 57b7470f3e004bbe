"""What leaves a site: audited, guarded, and free of every patient identifier."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.audit import verify
from medfed.cli import app
from server.metrics import RunMetrics
from simulations.synth import synthesize
from tests.medfed.helpers import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _identifiers(root: Path) -> set[str]:
    found: set[str] = set()
    for per_site in json.loads((root / "identifiers.json").read_text()).values():
        for values in per_site.values():
            found |= {str(v) for v in values if len(str(v)) >= 5}
    return found


def test_no_patient_identifier_leaves_and_every_reply_is_audited(tmp_path: Path) -> None:
    data = tmp_path / "data"
    synthesize(data, sites=3, images_per_site=30, seed=5, test_images=30)
    identifiers = _identifiers(data)
    assert len(identifiers) > 20
    # the identifiers are really in the sites' files, so finding none below means something
    some_dicom = next((data / "sites").rglob("*.dcm")).read_bytes()
    assert any(i.encode() in some_dicom for i in identifiers)

    run_dir = tmp_path / "run"
    done = subprocess.run(
        [str(BIN / "medfed"), "simulate", "--data", str(data / "sites"), "--out", str(run_dir),
         "--rounds", "2", "--local-steps", "2", "--batch-size", "16", "--image-size", "32",
         "--metrics-port", str(free_port()), "--verbose"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    metrics = RunMetrics()
    metrics.replay(results["rounds"], 2)
    outputs = {
        "stdout": done.stdout.encode(), "stderr": done.stderr.encode(),
        "/metrics": metrics.prometheus_text(),
        "/api/state": json.dumps(metrics.snapshot(), default=str).encode(),
    }
    outputs |= {str(p): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    leaks = {(where, i) for where, blob in outputs.items() for i in identifiers
             if i.encode() in blob}
    assert not leaks

    # every reply each site sent is in its audit trail, chained, and the chain is checked
    for site in sorted(results["privacy"]):
        trail = run_dir / "site-state" / site / "audit.jsonl"
        result = verify(trail)
        # 2 training replies (the second with round 1's score), the last round's evaluation,
        # then the run's closing cross-site evaluation
        assert result.ok and result.entries == 4, result
        entries = [json.loads(line) for line in trail.read_text().splitlines()]
        assert [e["message_type"] for e in entries] == ["train"] * 2 + ["evaluate"] * 2
        assert entries[-1]["configs"]["evaluation"] == {"split": "test"}
        assert entries[0]["configs"]["site"] == {"name": site}
        assert entries[0]["metrics"]["epsilon"] == pytest.approx(
            results["rounds"][0]["privacy"][site]["epsilon"]
        )

    # the CLI verifies it, and a trail edited after the fact fails verification
    state = run_dir / "site-state" / sorted(results["privacy"])[0]
    runner = CliRunner()
    ok = runner.invoke(app, ["site", "audit", "--state", str(state), "--verify"])
    assert ok.exit_code == 0 and "chain intact" in ok.output
    trail = state / "audit.jsonl"
    lines = trail.read_text().splitlines()
    lines[2] = lines[2].replace('"evaluate"', '"train"')
    trail.write_text("\n".join(lines) + "\n")
    altered = runner.invoke(app, ["site", "audit", "--state", str(state), "--verify"])
    assert altered.exit_code == 1 and "line 3" in altered.output
