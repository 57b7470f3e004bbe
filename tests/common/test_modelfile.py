"""Model files are never unpickled: a crafted file runs no code under any loader, and is named."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from common.config import ConfigError, RunConfig
from common.modelfile import UnsafeModelFile, load_model_file, load_npz, load_torch_file
from medfed.cli import app
from models import build_model
from server.record import RunRecord
from server.tasks.classify import ClassifyCentral, load_encoder_run


class _Payload:
    """Unpickling this runs `touch MARKER`: what a crafted model.pt does to a full unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle's protocol
        return (os.system, (f"touch {self.marker}",))


def _crafted_model(run_dir: Path, marker: Path, task: str = "classify") -> Path:
    """A model.pt shaped as medfed writes it, with a payload in its config."""
    cfg = RunConfig(task=task, image_size=16)
    model = build_model(cfg.model, in_channels=1, num_classes=2, image_size=16)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "model.pt"
    torch.save({"model": cfg.model, "state_dict": model.state_dict(),
                "config": {**cfg.to_mapping(), "x": _Payload(marker)},
                "model_args": {"in_channels": 1, "num_classes": 2, "image_size": 16}}, path)
    return path


def test_the_payload_is_real_under_a_full_unpickler(tmp_path: Path) -> None:
    """A full unpickler does run it: the tests below can fail."""
    marker = tmp_path / "proof"
    torch.load(_crafted_model(tmp_path / "proof-run", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["audit-privacy", "sample"])
def test_a_crafted_model_runs_no_code_under_the_cli_and_exits_2(
    tmp_path: Path, command: str
) -> None:
    marker = tmp_path / "PWNED"
    path = _crafted_model(tmp_path / "run", marker,
                          task="synthesize" if command == "sample" else "classify")
    args = {
        "audit-privacy": ["audit-privacy", str(tmp_path / "run"), "--data", str(tmp_path)],
        "sample": ["sample", str(tmp_path / "run"), "--out", str(tmp_path / "synthetic")],
    }[command]
    result = CliRunner().invoke(app, args)
    assert not marker.exists(), "the pickle payload ran"
    assert result.exit_code == 2, result.output
    assert str(path) in result.output.replace("\n", "")
    text = " ".join(result.output.split())
    assert "refused" in text and "posix.system" in text


def test_a_crafted_encoder_runs_no_code_under_init_encoder(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = _crafted_model(tmp_path / "ae", marker, task="autoencode")
    with pytest.raises(UnsafeModelFile, match="--init-encoder model") as refused:
        load_encoder_run(tmp_path / "ae")
    assert str(path) in str(refused.value)
    cfg = RunConfig(image_size=16, init_encoder=str(tmp_path / "ae"))
    with pytest.raises(ConfigError, match="refused to load"):
        ClassifyCentral().initial_state(cfg)
    assert not marker.exists()


def test_a_crafted_reference_or_any_torch_file_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "reference.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, path)
    with pytest.raises(UnsafeModelFile, match="reference classifier"):
        load_torch_file(path, what="reference classifier")
    assert not marker.exists()


def test_a_crafted_checkpoint_runs_no_code_under_resume(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    run.mkdir()
    record = RunRecord(run, RunConfig(sites_dir=str(tmp_path), image_size=16, rounds=2))
    record.save_checkpoint({"w": np.zeros(3, np.float32)}, {})
    arrays = run / "checkpoint" / "arrays.npz"
    np.savez(arrays, w=np.array([_Payload(marker)], dtype=object))
    with pytest.raises(UnsafeModelFile, match="arrays.npz"):
        load_npz(arrays)
    result = CliRunner().invoke(app, ["simulate", "--resume", str(run)])
    assert not marker.exists()
    assert result.exit_code == 2, result.output
    assert "arrays.npz" in result.output.replace("\n", "")


def test_what_medfed_writes_still_loads(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    cfg = RunConfig(image_size=16)
    record = RunRecord(run, cfg)
    model = build_model(cfg.model, in_channels=1, num_classes=2, image_size=16)
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    saved = load_model_file(record.save_model(arrays))
    assert saved["model"] == "cnn" and saved["config"]["image-size"] == 16
    assert set(saved["state_dict"]) == set(arrays)
    record.save_checkpoint(arrays, {"m": np.ones(2)})
    _, back, strategy = RunRecord.load_checkpoint(run)
    assert set(back) == set(arrays) and strategy["m"].tolist() == [1.0, 1.0]


def test_a_truncated_model_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(UnsafeModelFile, match=str(path)):
        load_model_file(path)
