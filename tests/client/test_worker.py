"""The site's warm worker (client.worker) behind the torch-free ClientApp shim (client.shim).

Real worker processes on a real site folder: the shim's reply equals the in-process ClientApp's,
the worker stays warm across messages and runs, a SIGKILL mid-round fails that round cleanly and
the next one runs on a new worker, another user cannot talk to it, and another app version gets
its own worker.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from client import shim
from client import worker_link as link
from client.audit_state import verify_state
from client.failures import SiteFailure
from common.config import RunConfig
from common.flower_compat.task_identity import identity
from common.packing import pack, unpack
from models import build_model
from tests.simulations.conftest import write_easy_site

ROOT = Path(__file__).resolve().parents[2]
TIMING = {"train-seconds"}


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with identity(task_id=1, run_id=1, node_id=1):
        yield


@pytest.fixture(scope="module")
def site_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("worker-sites")
    write_easy_site(root / "sites" / "site-a", 40, 0.5, np.random.default_rng(0))
    return root


def _config(root: Path, out: Path, **changes: object) -> RunConfig:
    values: dict = {"rounds": 3, "dp": False, "image_size": 32, "local_steps": 2,
                    "batch_size": 8, "run_key": "run-1", "seed": 0,
                    "sites_dir": str(root / "sites"), "out": str(out),
                    "ledger_dir": str(out / "ledger")}
    values.update(changes)
    return RunConfig(**values)


def _message(kind: str, cfg: RunConfig, server_round: int, state) -> Message:
    config = ConfigRecord({**cfg.to_mapping(), "server-round": server_round})
    return Message(RecordDict({"arrays": ArrayRecord(state), "config": config}), dst_node_id=1,
                   message_type=MessageType.TRAIN if kind == "train" else MessageType.EVALUATE)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                   run_config={})


def _initial(cfg: RunConfig) -> dict:
    return build_model(cfg.model, in_channels=1, num_classes=2, image_size=32).state_dict()


@pytest.fixture
def supervised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[link.WorkerSupervisor]:
    """`medfed site`'s supervisor with its worker, named to the shim as `medfed site` does."""
    supervisor = link.WorkerSupervisor(tmp_path / "state", restart_after_s=0.2)
    supervisor.start()
    monkeypatch.setenv(link.SOCKET_ENV, str(supervisor.socket))
    link.wait_for_worker(supervisor.socket, None, wait_s=120)
    yield supervisor
    supervisor.stop()


def _via_shim(msg: Message, context: Context) -> Message:
    """`msg` as a deployed site gets it: packed by the aggregator's grid, through the shim."""
    return unpack(shim.forward(pack(msg), context))


def _arrays(reply: Message) -> dict:
    """The reply's model, as a state dict."""
    assert not reply.has_error(), reply.error
    return reply.content.array_records["arrays"].to_torch_state_dict()


def test_the_shim_imports_no_torch() -> None:
    probe = ("import sys, client.shim; heavy = [m for m in ('torch', 'opacus', 'monai') "
             "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_replies_through_the_worker_equal_the_in_process_app_and_it_stays_warm(
    site_root: Path, tmp_path: Path, supervised: link.WorkerSupervisor
) -> None:
    from client.app import app as in_process

    here, there = _config(site_root, tmp_path / "here"), _config(site_root, tmp_path / "there")
    state_here = state_there = _initial(here)
    pid = link.hello(supervised.socket)["pid"]  # type: ignore[index]
    for server_round in (1, 2):
        expected = in_process(_message("train", here, server_round, state_here), _context())
        got = _via_shim(_message("train", there, server_round, state_there), _context())
        state_here, state_there = _arrays(expected), _arrays(got)
        assert state_here.keys() == state_there.keys()
        for name in state_here:
            np.testing.assert_array_equal(state_here[name].numpy(), state_there[name].numpy(),
                                          err_msg=name)
        want, have = (dict(r.content.metric_records["metrics"]) for r in (expected, got))
        assert {k: v for k, v in want.items() if k not in TIMING} == {
            k: v for k, v in have.items() if k not in TIMING}
        evaluated = _via_shim(_message("evaluate", there, server_round, state_there),
                                 _context())
        assert evaluated.content.metric_records["metrics"]["num-examples"] > 0
        # the reply is the shim's own reply to Flower's message
        assert got.metadata.reply_to_message_id == ""  # built outside Flower: no message id
    # the same warm process answered every message, and a second run too
    second = _config(site_root, tmp_path / "there", run_key="run-2")
    assert not _via_shim(_message("train", second, 1, _initial(second)), _context()).has_error()
    # under DP the noise differs, the accounting does not: the same epsilon and privacy report
    dp_here, dp_there = (_config(site_root, tmp_path / where, run_key="run-dp", dp=True)
                         for where in ("here", "there"))
    start = _initial(dp_here)
    expected = in_process(_message("train", dp_here, 1, start), _context())
    got = _via_shim(_message("train", dp_there, 1, start), _context())
    assert got.content.metric_records["metrics"]["epsilon"] == (
        expected.content.metric_records["metrics"]["epsilon"])
    assert dict(got.content.config_records["privacy"]) == dict(
        expected.content.config_records["privacy"])
    answer = link.hello(supervised.socket)
    assert answer is not None and answer["pid"] == pid and answer["served"] == 6
    assert supervised.starts == 1


def test_a_worker_killed_mid_round_fails_that_round_and_the_next_runs(
    site_root: Path, tmp_path: Path, supervised: link.WorkerSupervisor
) -> None:
    cfg = _config(site_root, tmp_path / "out", dp=True, local_steps=400, rounds=3)
    state = _initial(cfg)
    first = _via_shim(_message("train", _config(site_root, tmp_path / "out", dp=True),
                                  1, state), _context())
    assert not first.has_error(), first.error
    pid = link.hello(supervised.socket)["pid"]  # type: ignore[index]
    outcome: dict[str, BaseException | Message] = {}

    def long_round() -> None:
        try:
            outcome["reply"] = _via_shim(_message("train", cfg, 2, state), _context())
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            outcome["raised"] = exc

    thread = threading.Thread(target=long_round)
    thread.start()
    time.sleep(3)  # the worker is training round 2
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=60)
    raised = outcome.get("raised")
    assert isinstance(raised, SiteFailure), outcome
    assert str(raised) == ("site this site: train failed (SiteWorkerStopped); the details stay "
                           "in the site's own log")
    # a new worker answers the next round; the privacy state and the audit trail are whole
    cfg3 = _config(site_root, tmp_path / "out", dp=True)
    third = _via_shim(_message("train", cfg3, 3, state), _context())
    assert not third.has_error(), third.error
    assert link.hello(supervised.socket)["pid"] != pid  # type: ignore[index]
    assert supervised.starts == 2
    report = verify_state(tmp_path / "out" / "site-state" / "site-a")
    assert report.entries == 2  # rounds 1 and 3 left the site; round 2 sent nothing


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another user needs root")
def test_another_user_cannot_reach_the_worker(supervised: link.WorkerSupervisor) -> None:
    path = supervised.socket
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700

    def as_nobody() -> str:
        probe = (
            "import os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            f"    s.connect({str(path)!r})\n"
            "except OSError as e:\n"
            "    print('refused', type(e).__name__); sys.exit(0)\n"
            "try:\n"
            "    s.sendall(b'\\0' * 8)\n"
            "    print('answered' if s.recv(1) else 'closed')\n"
            "except (ConnectionResetError, BrokenPipeError):\n"
            "    print('closed')\n"
        )
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              timeout=60, check=False)
        return done.stdout.strip() + done.stderr[-500:]

    assert as_nobody() == "refused PermissionError"
    # with every folder on the way and the socket opened up, the worker's own check of the
    # peer's credentials still refuses: the connection closes unanswered
    opened = [p for p in path.parents if p != Path("/") and not p.stat().st_mode & 0o001]
    modes = {p: p.stat().st_mode & 0o777 for p in opened}
    try:
        for folder in opened:
            os.chmod(folder, modes[folder] | 0o011)
        os.chmod(path, 0o666)
        assert as_nobody() == "closed"
    finally:
        for folder, mode in modes.items():
            os.chmod(folder, mode)
    assert link.hello(path) is not None  # and the site's own user is still served


def test_a_new_app_version_gets_its_own_worker(
    site_root: Path, tmp_path: Path, supervised: link.WorkerSupervisor,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    old = link.hello(supervised.socket)
    assert old is not None and old["code"] == link.code_identity(ROOT)
    newer = tmp_path / "app-v2"
    for package in link.PACKAGES:
        shutil.copytree(ROOT / package, newer / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (newer / "client" / "worker.py").write_text(
        (newer / "client" / "worker.py").read_text() + "\n# version 2\n")
    monkeypatch.setattr(link, "app_folder", lambda: newer)
    cfg = _config(site_root, tmp_path / "out")
    reply = _via_shim(_message("train", cfg, 1, _initial(cfg)), _context())
    assert not reply.has_error(), reply.error
    now = link.hello(supervised.socket)
    assert now is not None and now["code"] == link.code_identity(newer) != old["code"]
    assert now["pid"] != old["pid"]


def test_without_a_worker_the_shim_runs_the_app_in_its_own_process(
    site_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(link.SOCKET_ENV, raising=False)
    cfg = _config(site_root, tmp_path / "out")
    reply = _via_shim(_message("train", cfg, 1, _initial(cfg)), _context())
    assert reply.content.metric_records["metrics"]["steps"] == 2


def test_a_request_from_a_socket_that_closes_early_is_no_answer(tmp_path: Path) -> None:
    left, right = socket.socketpair()
    with left, right:
        right.close()
        with pytest.raises(link.WorkerGone):
            link.receive_frames(left)
