"""On a CUDA GPU, the path a hospital's GPU takes: every task's training and evaluation run there,
DP-SGD is applied and accounted as on the CPU, and the per-sample gradients computed there are
the ones the CPU computes. Skipped where no GPU is present (CI); run on one with
`pytest tests/training/test_cuda.py`.
"""

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from common.config import RunConfig
from common.privacy import PrivacyState, epsilon_of
from common.training.loop import LocalTraining
from common.training.tasks import Fit, get_task
from tests.training.helpers import SIZE, N, blobs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
TASKS = ["classify", "segment", "autoencode", "synthesize"]


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 matmuls and convolutions differ from the CPU's float32 by about 1e-3: keep them off."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _samples(task: str) -> tuple[np.ndarray, np.ndarray]:
    images, masks, labels = blobs()
    return (images, masks) if task == "segment" else (images, labels)


def _privacy() -> PrivacyState:
    return PrivacyState.plan(
        num_examples=N, batch_size=8, rounds=1, steps_per_round=2 * -(-N // 8), target_epsilon=8,
        delta=1e-5,
        accountant="rdp", max_grad_norm=1.0,
    )


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False),
        nn.Conv2d(2, 4, 3, dilation=2),
        nn.Conv3d(2, 4, 3, padding=1),
    ],
    ids=["conv2d", "strided-grouped", "dilated", "conv3d"],
)
def test_per_sample_conv_gradients_on_cuda_equal_the_cpu(layer: nn.Module) -> None:
    import common.training.loop  # noqa: F401  registers medfed's convolution sampler with Opacus

    torch.manual_seed(0)
    shape = (6, layer.in_channels, *([9] * (layer.weight.dim() - 2)))
    x = torch.randn(shape)
    per_device = []
    for device in (CPU, CUDA):
        module = GradSampleModule(nn.Sequential(layer).to(device))
        module(x.to(device)).square().sum().backward()
        per_device.append({n: p.grad_sample for n, p in module.named_parameters()})
        module._close()
    for name, on_cpu in per_device[0].items():
        on_gpu = per_device[1][name]
        assert on_gpu.is_cuda and on_gpu.shape == on_cpu.shape
        assert _close(on_gpu, on_cpu) < 1e-5, name


@pytest.mark.parametrize("task", TASKS)
def test_dp_training_runs_on_the_gpu_and_is_accounted(task: str) -> None:
    cfg = RunConfig(task=task, image_size=SIZE)
    trainer = get_task(task)
    model = trainer.build(cfg)
    privacy = _privacy()
    report = trainer.train(
        model, _samples(task), cfg, Fit(LocalTraining(epochs=2, batch_size=8), CUDA, privacy, 0,
                                        False),
    )
    assert all(p.is_cuda for p in model.parameters())
    assert np.isfinite(report.loss)
    assert privacy.steps == report.steps == 2 * (N // 8)
    assert privacy.epsilon() == pytest.approx(
        epsilon_of([(privacy.noise_multiplier, privacy.sample_rate, privacy.steps)],
                   delta=1e-5, accountant="rdp"), rel=1e-9)
    metrics = trainer.evaluate(model, _samples(task), cfg, CUDA)
    assert metrics and set(metrics) <= trainer.metrics
    assert np.isfinite(metrics["loss"])  # hd95 is NaN where no lesion was predicted yet


@pytest.mark.parametrize("task", ["classify", "segment", "autoencode"])
def test_plain_training_on_the_gpu_follows_the_cpu(task: str) -> None:
    """Same weights, same seed, same batches: the GPU's round ends where the CPU's does."""
    cfg = RunConfig(task=task, image_size=SIZE)
    trainer = get_task(task)
    torch.manual_seed(0)
    start = trainer.build(cfg).state_dict()
    ends = []
    for device in (CPU, CUDA):
        model = trainer.build(cfg)
        model.load_state_dict(start)
        for m in model.modules():  # dropout masks come from each device's own generator
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        # SGD, not Adam: Adam scales a gradient of pure rounding error (a bias before a
        # normalisation layer has none) to a full step, whose sign differs between devices
        settings = LocalTraining(epochs=1, batch_size=8, optimizer="sgd", lr=0.05)
        trainer.train(model, _samples(task), cfg, Fit(settings, device, None, 3, False))
        ends.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
    for name, on_cpu in ends[0].items():
        if on_cpu.is_floating_point():
            moved = float((on_cpu - start[name]).norm())
            apart = float((ends[1][name] - on_cpu).norm())
            assert apart <= 0.02 * moved + 1e-5 * float(on_cpu.norm()) + 1e-6, name
