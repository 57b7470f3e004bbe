"""--pretrained FILE: matching layers loaded, mismatched ones kept, wrong files refused."""

import logging
import os
from pathlib import Path

import pytest
import torch

from common.config import ConfigError, RunConfig
from server.tasks.classify import ClassifyCentral


def _cfg(path: Path, **kwargs) -> RunConfig:
    return RunConfig(pretrained=str(path), image_size=32, **kwargs)


def _weights(cfg: RunConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    from models import build_model

    return build_model(cfg.model, in_channels=cfg.channels, num_classes=cfg.num_classes,
                       image_size=cfg.image_size).state_dict()


@pytest.mark.parametrize("layout", ["bare", "medfed", "module-prefix"])
def test_the_files_weights_replace_the_seeded_ones(tmp_path: Path, layout: str) -> None:
    path = tmp_path / "weights.pt"
    cfg = _cfg(path, model="resnet18")
    theirs = _weights(cfg, seed=7)
    saved: object = {
        "bare": theirs,
        "medfed": {"model": "resnet18", "model_args": {}, "state_dict": theirs, "config": {}},
        "module-prefix": {"state_dict": {f"module.{k}": v for k, v in theirs.items()},
                          "epoch": 90},
    }[layout]
    torch.save(saved, path)
    seeded = ClassifyCentral().initial_state(RunConfig(model="resnet18", image_size=32))
    state = ClassifyCentral().initial_state(cfg)
    key = "layer3.1.conv2.weight"
    assert not torch.equal(seeded[key], theirs[key])
    assert all(torch.equal(state[k], theirs[k]) for k in theirs)


def test_a_head_of_other_classes_keeps_its_initial_weights(tmp_path: Path, caplog) -> None:
    path = tmp_path / "three-classes.pt"
    theirs = _weights(_cfg(path, model="cnn", num_classes=3), seed=7)
    torch.save(theirs, path)
    cfg = _cfg(path, model="cnn", num_classes=2)
    seeded = ClassifyCentral().initial_state(RunConfig(image_size=32))
    with caplog.at_level(logging.INFO, logger="medfed.server"):
        state = ClassifyCentral().initial_state(cfg)
    assert torch.equal(state["head.1.weight"], seeded["head.1.weight"])
    assert torch.equal(state["features.0.0.weight"], theirs["features.0.0.weight"])
    lines = [r.getMessage() for r in caplog.records if "--pretrained" in r.getMessage()]
    assert len(lines) == 1
    assert "head.1.weight (3, 64) != (2, 64)" in lines[0] and "head.1.bias" in lines[0]


def test_a_file_for_another_network_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "densenet.pt"
    torch.save(_weights(_cfg(path, model="densenet121"), seed=1), path)
    with pytest.raises(ConfigError, match="no layer of densenet.pt matches --model resnet18"):
        ClassifyCentral().initial_state(_cfg(path, model="resnet18"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"epoch": 3, "lr": 0.1}, "not a state dict"),
        ([torch.zeros(3)], "not a state dict"),
        (None, "no such file"),
    ],
)
def test_files_that_hold_no_state_dict_are_refused(tmp_path: Path, content, message) -> None:
    path = tmp_path / "weights.pt"
    if content is not None:
        torch.save(content, path)
    with pytest.raises(ConfigError, match=message) as raised:
        ClassifyCentral().initial_state(_cfg(path))
    assert str(path) in str(raised.value) and "--pretrained" in str(raised.value)


def test_a_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    torch.save({"state_dict": Boom()}, path)
    with pytest.raises(ConfigError, match="refused to load"):
        ClassifyCentral().initial_state(_cfg(path))
    assert not (tmp_path / "ran").exists()
