"""A run's files: a full disk and a broken checkpoint are reported with the path and the fix."""

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from common.config import RunConfig
from common.outputs import OutputError
from medfed.cli import app
from medfed.console import EXIT_BAD_INPUT, EXIT_FAILED
from server import record as record_module
from server.record import CHECKPOINT, CheckpointError, RunRecord
from tests.simulations.conftest import write_easy_hospitals

runner = CliRunner()


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _record(tmp_path: Path) -> RunRecord:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return RunRecord(run_dir, RunConfig(out=str(run_dir)))


def _checkpointed(tmp_path: Path) -> RunRecord:
    rec = _record(tmp_path)
    rec.rounds.append({"round": 1})
    rec.save_checkpoint({"w": np.ones(3, dtype=np.float32)}, {})
    return rec


def test_a_full_disk_names_results_json_and_says_to_free_space(tmp_path, monkeypatch) -> None:
    rec = _record(tmp_path)
    monkeypatch.setattr(record_module.json, "dump", _full_disk)
    with pytest.raises(OutputError) as err:
        rec.write_results()
    message = str(err.value)
    assert str(rec.run_dir / "results.json") in message
    assert "free space" in message
    assert not [p for p in rec.run_dir.iterdir() if p.name.startswith(".results")]


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, monkeypatch) -> None:
    rec = _checkpointed(tmp_path)
    rec.rounds.append({"round": 2})
    monkeypatch.setattr(record_module.np, "savez", _full_disk)
    with pytest.raises(OutputError, match="free space") as err:
        rec.save_checkpoint({"w": np.zeros(3, dtype=np.float32)}, {})
    assert str(rec.run_dir) in str(err.value)
    monkeypatch.undo()
    _, arrays, _ = RunRecord.load_checkpoint(rec.run_dir)  # round 1's, whole
    assert arrays["w"].tolist() == [1, 1, 1]
    assert not [p for p in rec.run_dir.iterdir() if p.name.startswith(".checkpoint-")]


@pytest.mark.parametrize(
    ("damage", "broken"),
    [
        (lambda c: (c / "state.json").write_text("{not json"), "state.json"),
        (lambda c: (c / "arrays.npz").write_bytes(b"PK\x03\x04 truncated"), "arrays.npz"),
        (lambda c: (c / "arrays.npz").unlink(), "arrays.npz"),
        (lambda c: (c / "state.json").write_text(json.dumps({"config": {}})), "state.json"),
    ],
)
def test_a_broken_checkpoint_names_its_file(tmp_path: Path, damage, broken: str) -> None:
    rec = _checkpointed(tmp_path)
    damage(rec.run_dir / CHECKPOINT)
    with pytest.raises(CheckpointError) as err:
        RunRecord.load_checkpoint(rec.run_dir)
    assert str(rec.run_dir / CHECKPOINT / broken) in str(err.value)
    assert "new run" in str(err.value)


def test_resume_from_a_corrupt_checkpoint_exits_2_naming_the_file(tmp_path: Path) -> None:
    rec = _checkpointed(tmp_path)
    (rec.run_dir / CHECKPOINT / "state.json").write_text("")
    result = runner.invoke(app, ["simulate", "--resume", str(rec.run_dir)],
                           env={**os.environ, "COLUMNS": "300"})
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert str(rec.run_dir / CHECKPOINT / "state.json") in result.output
    assert "Expecting value" in result.output and "new run" in result.output


def test_central_on_a_full_disk_exits_1_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    root = write_easy_hospitals(tmp_path / "h", [("a", 20, 0.5)], 10, seed=0)
    monkeypatch.setattr(record_module.json, "dump", _full_disk)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["central", "--data", str(root / "sites"), "--test-data", str(root / "test"),
              "--out", str(out), "--epochs", "1", "--image-size", "16"],
        env={**os.environ, "COLUMNS": "300"},
    )
    assert result.exit_code == EXIT_FAILED, result.output
    assert str(out / "central.json") in result.output
    assert "no space left" in result.output and "free space" in result.output


def test_out_that_is_a_file_is_named(tmp_path: Path) -> None:
    a_file = tmp_path / "results"
    a_file.write_text("x")
    result = runner.invoke(app, ["central", "--data", str(tmp_path), "--out", str(a_file)],
                           env={**os.environ, "COLUMNS": "300"})
    assert result.exit_code == EXIT_BAD_INPUT
    assert f"--out {a_file} is a file" in result.output
