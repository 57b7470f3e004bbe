"""Per-sample convolution gradients for Opacus, computed as the weight gradient of one convolution.

DP-SGD needs every sample's own gradient before clipping. Opacus's convolution sampler unfolds
each input into an (N, C*k*k, H*W) patch matrix and contracts it with the output gradients; for
the narrow 3x3 convolutions of medfed's networks that copy is most of a DP-SGD step on a CPU.

Sample n's weight gradient is the weight gradient of the convolution applied to x[n] alone. Fold
the batch into the channel axis (input (1, N*C_in, ...), output gradient (1, N*C_out, ...)) and
the N convolutions become one convolution with N*groups groups, whose weight gradient PyTorch's
own convolution kernels compute without building a patch matrix. The result is the same numbers
as Opacus's sampler up to float rounding (tests/training/test_grad_sample.py), a third to a quarter
of the time at batch 32 (bench `dp_overhead_ratio`).

Importing this module registers the sampler for nn.Conv2d and nn.Conv3d in Opacus's registry (a
process-wide table, which is how Opacus takes custom samplers). A layer it does not cover (string
padding such as "same", a padding mode other than zeros, an empty batch) is passed to Opacus's
own sampler unchanged.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample as opacus_conv_grad_sample
from torch import nn

Conv = nn.Conv2d | nn.Conv3d


def _covered(layer: Conv, activations: torch.Tensor) -> bool:
    return (
        activations.shape[0] > 0
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


def per_sample_weight_grad(layer: Conv, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """(N, *layer.weight.shape): each sample's gradient of the loss with respect to the weight.

    Args:
        x: the layer's input, (N, C_in, *spatial).
        grad_out: the loss's gradient with respect to the layer's output, (N, C_out, *spatial').

    """
    n, dims = x.shape[0], x.dim() - 2
    folded_x = x.reshape(1, n * x.shape[1], *x.shape[2:])
    folded_g = grad_out.reshape(1, n * grad_out.shape[1], *grad_out.shape[2:])
    shape = (n * layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
    # convolution_backward reads only the weight's shape: a broadcast view allocates nothing
    weight = grad_out.new_empty(1).expand(shape)
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        folded_g, folded_x, weight, None, list(layer.stride), list(layer.padding),
        list(layer.dilation), False, [0] * dims, n * layer.groups, (False, True, False),
    )
    return grad_weight.view(n, *layer.weight.shape)


@register_grad_sampler([nn.Conv2d, nn.Conv3d])
def conv_grad_sample(
    layer: Conv, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus's grad-sampler interface: per-sample gradients of the layer's weight and bias."""
    x = activations[0]
    if not _covered(layer, x):
        result: dict[nn.Parameter, torch.Tensor] = opacus_conv_grad_sample(
            layer, activations, backprops
        )
        return result
    x = x.to(backprops.dtype)
    samples: dict[nn.Parameter, torch.Tensor] = {}
    weight, bias = layer.weight, layer.bias
    if isinstance(weight, nn.Parameter) and weight.requires_grad:
        samples[weight] = per_sample_weight_grad(layer, x, backprops)
    if isinstance(bias, nn.Parameter) and bias.requires_grad:
        samples[bias] = backprops.sum(dim=tuple(range(2, backprops.dim())))
    return samples
