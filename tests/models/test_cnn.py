import pytest
import torch
from opacus.validators import ModuleValidator

from models import build_model
from models.cnn import CNNClassifier


@pytest.mark.parametrize(
    ("in_channels", "num_classes", "image_size", "batch"),
    [(1, 2, 64, 3), (3, 2, 64, 2), (1, 5, 32, 4), (1, 2, 128, 1), (3, 3, 96, 2)],
)
def test_output_shape(in_channels: int, num_classes: int, image_size: int, batch: int) -> None:
    model = CNNClassifier(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    x = torch.randn(batch, in_channels, image_size, image_size)
    assert model(x).shape == (batch, num_classes)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_channels": 2}, "in_channels"),
        ({"num_classes": 1}, "num_classes"),
        ({"image_size": 60}, "multiple of 8"),
        ({"image_size": 4}, "multiple of 8"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_construction_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CNNClassifier(**kwargs)


def test_wrong_input_channels_raise() -> None:
    model = CNNClassifier(in_channels=1)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.zeros(2, 3, 64, 64))


def test_opacus_accepts_the_model() -> None:
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=64)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet9000", in_channels=1, num_classes=2, image_size=64)
