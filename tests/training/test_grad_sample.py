"""The grouped-convolution per-sample gradients equal autograd's, one sample at a time."""

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample as opacus_conv_grad_sample
from torch import nn

from common.training.grad_sample import conv_grad_sample
from models.autoencoder import ConvAutoencoder
from models.cnn import CNNClassifier


def _per_sample_autograd(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Each parameter's gradient stacked over samples, by one backward pass per sample."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        loss.backward()
        rows.append([p.grad.detach().clone() for p in model.parameters()])
    return [torch.stack(column) for column in zip(*rows, strict=True)]


LAYERS = [
    nn.Conv2d(1, 8, 3, padding=1),
    nn.Conv2d(6, 4, 3, stride=2, padding=2, dilation=2, groups=2),
    nn.Conv2d(3, 5, (3, 1), stride=(1, 2), bias=False),
    nn.Conv2d(4, 8, 4, stride=2, padding=1),
    nn.Conv3d(2, 3, 3, padding=1),
    nn.Conv3d(4, 4, 3, stride=2, groups=4),
]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda m: repr(m))
def test_layer_gradients_equal_one_backward_pass_per_sample(layer: nn.Module) -> None:
    torch.manual_seed(0)
    spatial = (9, 10) if isinstance(layer, nn.Conv2d) else (6, 7, 5)
    x = torch.randn(5, layer.in_channels, *spatial)
    out = layer(x)
    grad_out = torch.randn_like(out)
    samples = conv_grad_sample(layer, [x], grad_out)
    for i in range(len(x)):
        layer.zero_grad()
        layer(x[i : i + 1]).backward(grad_out[i : i + 1])
        torch.testing.assert_close(samples[layer.weight][i], layer.weight.grad)
        if layer.bias is not None:
            torch.testing.assert_close(samples[layer.bias][i], layer.bias.grad)
    assert (layer.bias is None) == (layer.bias not in samples)
    # and the same as Opacus's own unfold-based sampler
    theirs = opacus_conv_grad_sample(layer, [x], grad_out)
    for p, value in samples.items():
        torch.testing.assert_close(value, theirs[p], rtol=1e-4, atol=1e-5)


def test_uncovered_layers_go_to_opacus_sampler() -> None:
    same = nn.Conv2d(2, 3, 3, padding="same")
    x = torch.randn(4, 2, 8, 8)
    grad_out = torch.randn(4, 3, 8, 8)
    ours = conv_grad_sample(same, [x], grad_out)
    theirs = opacus_conv_grad_sample(same, [x], grad_out)
    for p in (same.weight, same.bias):
        torch.testing.assert_close(ours[p], theirs[p])
    empty = conv_grad_sample(same, [x[:0]], grad_out[:0])
    assert empty[same.weight].shape == (1, *same.weight.shape)  # Opacus's empty-batch answer


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_registered_for_opacus_and_whole_networks_match_autograd() -> None:
    import common.training.loop  # noqa: F401  (the import that registers it in training)

    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] is conv_grad_sample
    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv3d] is conv_grad_sample
    torch.manual_seed(1)
    model = CNNClassifier(in_channels=1, num_classes=2, image_size=16, width=4, depth=2, dropout=0)
    x, y = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 1, 0, 1, 0])
    expected = _per_sample_autograd(model, x, y)
    wrapped = GradSampleModule(model, loss_reduction="sum")
    nn.functional.cross_entropy(wrapped(x), y, reduction="sum").backward()
    for p, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad_sample, want, rtol=1e-4, atol=1e-5)
    wrapped._close()


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_three_dimensional_autoencoder_matches_autograd() -> None:
    import common.training.loop  # noqa: F401

    torch.manual_seed(2)
    model = ConvAutoencoder(
        in_channels=1, image_size=8, width=4, depth=1, latent_channels=4, dims=3
    )
    x = torch.rand(3, 1, 8, 8, 8)

    def loss(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
        # both outputs, as the autoencoding task trains them, so every parameter has a gradient
        reconstruction, spots = net(images, spots=True)
        return ((reconstruction - images) ** 2).sum() + (spots**2).sum()

    rows = []
    for i in range(len(x)):
        model.zero_grad()
        loss(model, x[i : i + 1]).backward()
        rows.append([p.grad.detach().clone() for p in model.parameters()])
    expected = [torch.stack(c) for c in zip(*rows, strict=True)]
    wrapped = GradSampleModule(model, loss_reduction="sum")
    loss(wrapped, x).backward()
    for p, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad_sample, want, rtol=1e-4, atol=1e-5)
    wrapped._close()
