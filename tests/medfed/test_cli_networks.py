"""`medfed simulate --model resnet18 --pretrained FILE`: a whole federated DP run, end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.modelfile import load_model_file
from models import build_model
from simulations.synth import synthesize


@pytest.mark.slow
def test_a_resnet_trains_from_the_users_weights(tmp_path: Path) -> None:
    synthesize(tmp_path / "data", sites=2, images_per_site=40, seed=3, test_images=40)
    torch.manual_seed(7)
    # three classes: the head does not fit the run's two and keeps its initial weights
    theirs = build_model("resnet18", in_channels=1, num_classes=3, image_size=32).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.items()}}, tmp_path / "w.pt")
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "medfed", "simulate", "--data", str(tmp_path / "data" / "sites"),
        "--test-data", str(tmp_path / "data" / "test"), "--out", str(run_dir),
        "--model", "resnet18", "--image-size", "32", "--rounds", "1", "--local-steps", "2",
        "--batch-size", "8", "--metrics-port", "0", "--pretrained", str(tmp_path / "w.pt"),
        # only the head trains: every other layer must reach model.pt as the file had it
        "--encoder-lr-scale", "0",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "loaded 60 of the 62 tensors of --model resnet18" in output
    assert "fc.weight (3, 512) != (2, 512)" in output

    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["model"] == "resnet18"
    saved = load_model_file(run_dir / "model.pt")
    assert saved["model"] == "resnet18"
    state = saved["state_dict"]
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer2.0.downsample.0.weight"):
        assert torch.allclose(state[key], theirs[key], atol=1e-6), key
    model = build_model("resnet18", **saved["model_args"])
    model.load_state_dict(state)  # the run's model file is a working resnet18
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "vit"], "--model must be one of cnn, resnet18, resnet34, densenet121"),
        (["--model", "resnet18", "--init-encoder", "."], "--init-encoder initialises --model cnn"),
    ],
)
def test_networks_that_cannot_run_exit_2(small_hospitals: Path, tmp_path: Path, args,
                                         message) -> None:
    from typer.testing import CliRunner

    from medfed.cli import EXIT_BAD_INPUT, app

    result = CliRunner().invoke(
        app, ["simulate", "--data", str(small_hospitals / "sites"), "--out",
              str(tmp_path / "r"), "--metrics-port", "0", *args],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert message in " ".join(result.output.split())


@pytest.mark.slow
def test_an_image_too_small_for_the_network_names_image_size(small_hospitals: Path,
                                                              tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "medfed", "simulate", "--data", str(small_hospitals / "sites"),
           "--out", str(tmp_path / "r"), "--metrics-port", "0", "--model", "densenet121",
           "--image-size", "24", "--rounds", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 2, (done.stdout + done.stderr)[-3000:]
    output = done.stdout + done.stderr
    assert "--image-size) must be at least 28 px for densenet121, got 24" in output
