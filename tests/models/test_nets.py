"""ResNet-18/34 and DenseNet-121: shapes, Opacus validity, a DP step, stems, bad arguments."""

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from common.config import TASK_MODELS, ConfigError, RunConfig
from common.privacy import PrivacyState
from common.training.loop import LocalTraining, train_local, train_local_dp
from models import build_model, classifier_head

NETS = ["resnet18", "resnet34", "densenet121"]
CPU = torch.device("cpu")


def _data(n: int, channels: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.random((n, channels, size, size), dtype=np.float32)
    return images, np.arange(n) % 2


@pytest.mark.parametrize("name", NETS)
def test_opacus_accepts_it_and_a_dp_step_without_noise_or_clipping_is_a_plain_step(name):
    """Per-sample gradients (medfed's conv sampler, GroupNorm) sum to the batch gradient."""
    torch.manual_seed(0)
    plain = build_model(name, in_channels=1, num_classes=2, image_size=28)
    assert ModuleValidator.validate(plain, strict=True) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    private = build_model(name, in_channels=1, num_classes=2, image_size=28)
    private.load_state_dict(plain.state_dict())
    images, labels = _data(3, 1, 28)
    settings = LocalTraining(batch_size=3, optimizer="sgd", lr=0.1, momentum=0.0)
    train_local(plain, images, labels, settings=settings, device=CPU)
    # sample rate 1: Poisson sampling keeps every image, so both take one full-batch step
    privacy = PrivacyState(
        noise_multiplier=0.0, sample_rate=1.0, planned_steps=1, target_epsilon=1e9, delta=1e-5,
        accountant="rdp", max_grad_norm=1e9,
    )
    report = train_local_dp(private, images, labels, settings=settings, device=CPU,
                            privacy=privacy)
    assert report.steps == 1
    moved = 0
    for (key, a), (_, b) in zip(
        plain.state_dict().items(), private.state_dict().items(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-5), key
    for key, value in private.state_dict().items():
        moved += int(not torch.equal(value, build_state(name)[key]))
    assert moved > 0


def build_state(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(name, in_channels=1, num_classes=2, image_size=28).state_dict()


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize(("channels", "classes", "size"), [(1, 2, 28), (3, 3, 40)])
def test_output_shapes(name, channels, classes, size):
    model = build_model(name, in_channels=channels, num_classes=classes, image_size=size)
    assert model(torch.rand(2, channels, size, size)).shape == (2, classes)


def test_3d_volumes():
    model = build_model("resnet18", in_channels=1, num_classes=2, image_size=28, dims=3)
    assert model(torch.rand(1, 1, 28, 28, 28)).shape == (1, 2)
    assert ModuleValidator.validate(model, strict=True) == []


@pytest.mark.parametrize(
    ("name", "size", "stem", "kernel", "stride"),
    [
        ("resnet18", 64, "conv1", 3, 1),  # small image: full-resolution stem, no max pool
        ("resnet18", 96, "conv1", 7, 2),  # the ImageNet stem
        ("densenet121", 28, "features.conv0", 3, 1),
        ("densenet121", 224, "features.conv0", 7, 2),
    ],
)
def test_the_stem_keeps_small_images_at_full_resolution(name, size, stem, kernel, stride):
    model = build_model(name, in_channels=1, num_classes=2, image_size=size)
    conv = model.get_submodule(stem)
    assert conv.kernel_size == (kernel, kernel) and conv.stride == (stride, stride)
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert bool(pools) == (size >= 96)


def test_resnet_layers_carry_torchvisions_names():
    keys = build_model("resnet18", in_channels=3, num_classes=2, image_size=224).state_dict()
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.weight", "fc.weight"} <= set(keys)
    assert "layer2.0.downsample.0.bias" not in keys  # torchvision has none either


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 20}, "--image-size"),
        ({"in_channels": 2}, "in_channels"),
        ({"num_classes": 1}, "num_classes"),
        ({"dims": 4}, "dims"),
    ],
)
@pytest.mark.parametrize("name", ["resnet34", "densenet121"])
def test_bad_construction_raises(name, kwargs, message):
    args = {"in_channels": 1, "num_classes": 2, "image_size": 32, "dims": 2} | kwargs
    with pytest.raises(ValueError, match=message):
        build_model(name, **args)


def test_wrong_input_is_named():
    model = build_model("resnet18", in_channels=1, num_classes=2, image_size=32)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.rand(1, 3, 32, 32))


@pytest.mark.parametrize("name", NETS)
def test_every_head_prefix_names_the_last_linear_layer(name):
    model = build_model(name, in_channels=1, num_classes=2, image_size=32)
    head = classifier_head(name)
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    in_head = {n for n, _ in model.named_parameters() if n.startswith(head)}
    assert in_head == {f"{last}.weight", f"{last}.bias"}
    assert name in TASK_MODELS["classify"] and TASK_MODELS["classify"][0] == "cnn"


@pytest.mark.parametrize("name", NETS)
def test_init_encoder_is_refused_naming_model(name):
    with pytest.raises(ConfigError, match=f"--model {name}"):
        RunConfig(model=name, init_encoder="runs/ae")


def test_encoder_lr_scale_0_trains_only_the_head_of_a_resnet_under_dp():
    """--encoder-lr-scale 0 with --model resnet18: DP-SGD moves fc.* and nothing else."""
    from common.training.tasks import Fit, get_task

    # logit adjustment off: its class-count release is not what this test is about
    cfg = RunConfig(model="resnet18", image_size=32, encoder_lr_scale=0.0, logit_adjust=0.0)
    task = get_task("classify")
    torch.manual_seed(0)
    model = task.build(cfg)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    privacy = PrivacyState(
        noise_multiplier=0.5, sample_rate=1.0, planned_steps=1, target_epsilon=1e9, delta=1e-5,
        accountant="rdp", max_grad_norm=1.0,
    )
    fit = Fit(LocalTraining(steps=1, batch_size=4, lr=1e-2), CPU, privacy, 0, False)
    task.train(model, _data(4, 1, 32), cfg, fit)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    assert moved == {"fc.weight", "fc.bias"}
