"""The field's classification networks: ResNet-18, ResNet-34 and DenseNet-121, valid for Opacus.

MONAI's implementations (`monai.networks.nets`, 2D or 3D, nothing downloaded), changed where
DP-SGD needs it:

- GroupNorm with 32 groups (Wu & He, ECCV 2018, the default they measured on ResNets) wherever
  MONAI would put BatchNorm: Opacus refuses BatchNorm, whose statistics mix the samples of a batch
  and so void per-sample clipping. MONAI 1.6.1's ResNet does not pass its `norm` on to the
  residual layers (`ResNet._make_layer` is called without it and defaults to batch norm):
  `ResNetGN._make_layer` passes it.
- No in-place operation on a layer's output. Opacus hooks every trainable layer, and autograd
  forbids changing a hooked layer's output in place ("Output 0 of BackwardHookFunction is a view
  and is being modified inplace"): MONAI's residual block adds its shortcut with `+=` and applies
  `ReLU(inplace=True)`, so `ResidualBlock` does both out of place.
- The stem follows the image size. Below 96 px (MedMNIST's 28 and 64 px images) the first
  convolution is 3x3 with stride 1 and there is no max pool, as in MedMNIST v2's 28 px ResNet:
  the ImageNet stem (7x7 stride 2, then a 3x3 max pool with stride 2) would leave a 28 px image
  7 px wide before the first block and 1 px at the last, throwing away the detail a small lesion
  is. From 96 px on (CheXNet's 224 px), the ImageNet stem: the cost the literature reports, and a
  stem that fits checkpoints trained that way.
- Layer names are MONAI's, which for the ResNets are torchvision's too (conv1, layer1.0.conv1,
  layer2.0.downsample.0, fc), so `--pretrained` finds the matching layers of such checkpoints.
  The head (`fc.`, `class_layers.`: `models.classifier_head`) is what `--encoder-lr-scale`
  leaves at full rate.

Images must be at least `MIN_IMAGE_SIZE` px: MedMNIST's smallest, where the last stage still
sees 4x4 positions. Any size from there on works (convolutions pad, the pooling is adaptive).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from monai.networks.nets import DenseNet121, ResNet
from monai.networks.nets.resnet import ResNetBlock
from torch import nn

GROUP_NORM = ("group", {"num_groups": 32})
RELU = ("relu", {"inplace": False})
# below this size the stem keeps full resolution (3x3 stride 1, no max pool)
SMALL_INPUT = 96
MIN_IMAGE_SIZE = 28
_RESNET_LAYERS = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}
_WIDTHS = [64, 128, 256, 512]


class ResidualBlock(ResNetBlock):
    """MONAI's basic residual block with GroupNorm, its ReLU and shortcut sum out of place."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        spatial_dims: int = 2,
        stride: int = 1,
        downsample: nn.Module | partial[torch.Tensor] | None = None,
        act: str | tuple[str, dict[str, Any]] = RELU,
        norm: str | tuple[str, dict[str, Any]] = GROUP_NORM,
    ) -> None:
        # MONAI builds its blocks with its defaults (in-place ReLU, batch norm): ours are forced
        super().__init__(
            in_planes, planes, spatial_dims=spatial_dims, stride=stride,
            downsample=downsample, act=RELU, norm=GROUP_NORM,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv-norm-relu-conv-norm, plus the shortcut, then relu."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: torch.Tensor = self.act(out + shortcut)
        return result


class ResNetGN(ResNet):
    """MONAI's ResNet with `ResidualBlock`s and GroupNorm in every layer, shortcuts included."""

    def _make_layer(self, *args: Any, **kwargs: Any) -> nn.Sequential:
        kwargs["norm"] = GROUP_NORM  # MONAI 1.6.1 calls this without `norm`: batch norm
        return super()._make_layer(*args, **kwargs)


def check_classifier_args(
    *, net: str, in_channels: int, num_classes: int, image_size: int, dims: int
) -> None:
    """The checks every classifier of this module shares; `net` names it in the message."""
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 (images) or 3 (volumes), got {dims}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size (--image-size) must be at least {MIN_IMAGE_SIZE} px for {net}, got "
            f"{image_size}; choose e.g. 64, or --model cnn for smaller images"
        )


def _check_input(x: torch.Tensor, in_channels: int, dims: int) -> None:
    if x.dim() != dims + 2 or x.shape[1] != in_channels:
        axes = "H, W" if dims == 2 else "D, H, W"
        raise ValueError(
            f"expected input of shape (N, {in_channels}, {axes}), got {tuple(x.shape)}"
        )


class ResNetClassifier(ResNetGN):
    """ResNet-18 or ResNet-34 for `in_channels` x `image_size`**dims inputs; logits (N, classes)."""

    def __init__(
        self,
        *,
        depth: str = "resnet18",
        in_channels: int = 1,
        num_classes: int = 2,
        image_size: int = 64,
        dims: int = 2,
    ) -> None:
        if depth not in _RESNET_LAYERS:
            raise ValueError(f"depth must be one of {', '.join(_RESNET_LAYERS)}, got {depth!r}")
        check_classifier_args(
            net=depth, in_channels=in_channels, num_classes=num_classes, image_size=image_size,
            dims=dims,
        )
        small = image_size < SMALL_INPUT
        super().__init__(
            block=ResidualBlock,
            layers=_RESNET_LAYERS[depth],
            block_inplanes=_WIDTHS,
            spatial_dims=dims,
            n_input_channels=in_channels,
            conv1_t_size=3 if small else 7,
            conv1_t_stride=1 if small else 2,
            no_max_pool=small,
            shortcut_type="B",  # a 1x1 convolution and a norm where the shape changes
            bias_downsample=False,  # as torchvision's and MONAI's resnet18/34 factories
            num_classes=num_classes,
            act=RELU,
            norm=GROUP_NORM,
        )
        if small:
            # MONAI builds the max pool even when no_max_pool skips it: no unused layer
            self.add_module("maxpool", nn.Identity())
        self.in_channels, self.dims = in_channels, dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, (N, num_classes)."""
        _check_input(x, self.in_channels, self.dims)
        logits: torch.Tensor = super().forward(x)
        return logits


class DenseNetClassifier(DenseNet121):
    """DenseNet-121 (CheXNet's network) with GroupNorm; logits (N, classes)."""

    def __init__(
        self, *, in_channels: int = 1, num_classes: int = 2, image_size: int = 64, dims: int = 2
    ) -> None:
        check_classifier_args(
            net="densenet121", in_channels=in_channels, num_classes=num_classes,
            image_size=image_size, dims=dims,
        )
        super().__init__(
            spatial_dims=dims, in_channels=in_channels, out_channels=num_classes,
            act=RELU, norm=GROUP_NORM,
        )
        if image_size < SMALL_INPUT:
            stem = nn.Conv2d if dims == 2 else nn.Conv3d
            # same names as the ImageNet stem (features.conv0), another kernel
            self.features.conv0 = stem(in_channels, 64, kernel_size=3, padding=1, bias=False)
            nn.init.kaiming_normal_(self.features.conv0.weight)
            self.features.pool0 = nn.Identity()
        self.in_channels, self.dims = in_channels, dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, (N, num_classes)."""
        _check_input(x, self.in_channels, self.dims)
        logits: torch.Tensor = super().forward(x)
        return logits


def build_classifier(
    name: str, *, in_channels: int, num_classes: int, image_size: int, dims: int = 2
) -> nn.Module:
    """`resnet18`, `resnet34` or `densenet121`, seeded by torch's global generator."""
    if name == "densenet121":
        return DenseNetClassifier(
            in_channels=in_channels, num_classes=num_classes, image_size=image_size, dims=dims
        )
    return ResNetClassifier(
        depth=name, in_channels=in_channels, num_classes=num_classes, image_size=image_size,
        dims=dims,
    )
