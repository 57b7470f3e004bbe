"""A site's log: one timestamped line per phase with run, round, task, steps, epsilon and time;
Opacus's known warnings explained once per process tree, never repeated."""

import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from client.app import make_client_app
from client.supernode import stamped
from common.config import RunConfig
from common.sites import site_refs
from server.run import initial_arrays
from tests.simulations.conftest import write_easy_hospitals

ROOT = Path(__file__).resolve().parents[2]
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def _message(cfg: RunConfig, kind: str, server_round: int) -> Message:
    arrays = ArrayRecord({k: torch.from_numpy(np.array(v)) for k, v in initial_arrays(cfg).items()})
    config = ConfigRecord({**cfg.to_mapping(), "server-round": server_round})
    return Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1,
                   message_type=kind, group_id=str(server_round))


def test_each_phase_logs_one_line_with_round_steps_epsilon_and_time(
    tmp_path: Path, task_identity, caplog
) -> None:
    sites = write_easy_hospitals(tmp_path / "data", [("site-a", 40, 0.5)], 10, seed=1) / "sites"
    refs = site_refs(sites, tmp_path / "state")
    cfg = RunConfig(out=str(tmp_path / "run"), rounds=2, local_steps=2, image_size=32,
                    batch_size=16, run_key="log-test")
    app = make_client_app(refs)
    context = Context(run_id=7, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    with (
        caplog.at_level(logging.INFO, logger="medfed"),
        warnings.catch_warnings(record=True) as seen,
    ):
        warnings.simplefilter("always")  # what is not filtered shows, however often
        for server_round in (1, 2):
            app(_message(cfg, MessageType.TRAIN, server_round), context)
        app(_message(cfg, MessageType.EVALUATE, 2), context)
    lines = [r.getMessage() for r in caplog.records if r.name == "medfed.client"]
    assert len(lines) == 3, lines
    for line, server_round in zip(lines[:2], (1, 2), strict=True):
        assert re.fullmatch(
            rf"site site-a, run log-test, round {server_round}, classify train: \d+ steps on "
            r"\d+ images, loss [\d.]+, epsilon [\d.]+ of 8, [\d.]+s",
            line,
        ), line
    assert re.fullmatch(r"site site-a, run log-test, round 2, classify evaluate: \d+ images, "
                        r".*auc .*, [\d.]+s", lines[2]), lines[2]
    shown = [str(w.message) for w in seen]
    assert not [m for m in shown if "Secure RNG" in m or "Optimal order" in m], shown


EXPLAIN = """
import subprocess, sys, warnings
from common import logs
from opacus import PrivacyEngine
logs.configure()
for _ in range(3):
    PrivacyEngine()  # Opacus warns "Secure RNG turned off" every time
    warnings.warn("Optimal order is the largest alpha. Please consider expanding the range")
if sys.argv[1] == "parent":  # a child, as Flower starts one ClientApp process per message
    subprocess.run([sys.executable, "-c", __doc__ or open(__file__).read(), "child"], check=True)
"""


def test_known_warnings_are_explained_once_per_process_tree(tmp_path: Path) -> None:
    script = tmp_path / "explain.py"
    script.write_text(EXPLAIN.replace('__doc__ or open(__file__).read()', repr(EXPLAIN)))
    done = subprocess.run([sys.executable, str(script), "parent"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert "UserWarning" not in done.stderr
    assert done.stderr.count("'Secure RNG turned off' warning is silenced") == 1, done.stderr
    assert done.stderr.count("'Optimal order is the largest alpha' warning is silenced") == 1
    assert re.match(rf"{STAMP} INFO medfed: ", done.stderr)


def test_supernode_lines_get_a_time_and_medfed_lines_keep_theirs() -> None:
    assert re.match(rf"{STAMP} INFO :      Received: train message", stamped(
        "INFO :      Received: train message 6b1f\n"))
    line = "2026-01-02 03:04:05 INFO medfed.client: site a, run 1, round 1 ...\n"
    assert stamped(line) == line
