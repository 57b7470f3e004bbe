"""The aggregator witnesses every site's signed audit head, and the site checks against it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.audit_state import HEAD, KEY, TRAIL
from common.audit_head import ChainHead, load_signing_key
from medfed.cli import app
from simulations.synth import synthesize
from tests.medfed.helpers import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _verify(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["site", "audit", "--verify", *args])
    return result.exit_code, " ".join(result.output.split())


def test_results_record_each_sites_head_and_the_trail_verifies_against_them(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    synthesize(data, sites=2, images_per_site=20, seed=3, test_images=10)
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [str(BIN / "medfed"), "simulate", "--data", str(data / "sites"), "--out", str(run_dir),
         "--rounds", "1", "--local-steps", "2", "--batch-size", "8", "--image-size", "32",
         "--metrics-port", str(free_port())],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = run_dir / "results.json"
    recorded = json.loads(results.read_text())
    heads = recorded["rounds"][0]["audit_heads"]
    closing = recorded["cross_site"]["audit_heads"]
    sites = sorted(p.name for p in (data / "sites").iterdir() if p.is_dir())
    assert sorted(heads) == sites and sorted(closing) == sites
    for site in sites:
        state = run_dir / "site-state" / site
        witnessed = ChainHead.from_json(heads[site], where="results.json")
        # the round's latest reply is the evaluation: the trail's second entry, signed
        assert witnessed.seq == 1 and witnessed.signature_ok()
        # the run's closing cross-site evaluation is the third, witnessed too
        last = ChainHead.from_json(closing[site], where="results.json")
        assert last.seq == 2 and last.signature_ok()
        entries = [json.loads(line) for line in (state / TRAIL).read_text().splitlines()]
        assert [e["message_type"] for e in entries] == ["train", "evaluate", "evaluate"]
        assert entries[1]["hash"] == witnessed.hash and entries[2]["hash"] == last.hash
        code, output = _verify("--state", str(state), "--witness", str(results))
        assert code == 0, output
        assert "the 2 heads the aggregator witnessed are in it" in output

    # the last entry cut and the head re-signed with the state's own key: consistent in
    # itself, but not with what the aggregator saw
    state = run_dir / "site-state" / sites[0]
    kept = (state / TRAIL).read_text().splitlines()[:-1]
    (state / TRAIL).write_text("\n".join(kept) + "\n")
    resigned = ChainHead.sign(load_signing_key(state / KEY), seq=1,
                              hash_hex=json.loads(kept[-1])["hash"])
    (state / HEAD).write_text(json.dumps(resigned.to_json()))
    assert _verify("--state", str(state))[0] == 0
    code, output = _verify("--state", str(state), "--witness", str(results))
    assert code == 1, output
    assert "the cross-site evaluation: the aggregator witnessed entry 2, but the trail ends " \
        "at entry 1: entries were cut" in output
