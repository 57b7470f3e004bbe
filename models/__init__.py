"""Networks trained at hospital sites. Nothing here imports Flower."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from models.autoencoder import ConvAutoencoder
from models.cgan import ConditionalGAN
from models.cnn import CNNClassifier
from models.unet import UNet

__all__ = [
    "CNNClassifier", "ConditionalGAN", "ConvAutoencoder", "UNet", "build_model", "classifier_head"
]

# name -> constructor taking (in_channels, num_classes, image_size); `dims` picks 2D or 3D
_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "cnn": lambda *, in_channels, num_classes, image_size, dims: _only_2d(
        "cnn", dims, CNNClassifier(
            in_channels=in_channels, num_classes=num_classes, image_size=image_size
        )
    ),
    "unet": lambda *, in_channels, num_classes, image_size, dims, **shape: UNet(
        in_channels=in_channels, num_classes=num_classes, image_size=image_size, dims=dims,
        **shape,
    ),
    "autoencoder": lambda *, in_channels, num_classes, image_size, dims: ConvAutoencoder(
        in_channels=in_channels, image_size=image_size, dims=dims
    ),
    "cgan": lambda *, in_channels, num_classes, image_size, dims: _only_2d(
        "cgan", dims, ConditionalGAN(
            in_channels=in_channels, num_classes=num_classes, image_size=image_size
        )
    ),
}


def _field_network(name: str) -> Callable[..., nn.Module]:
    def build(*, in_channels: int, num_classes: int, image_size: int, dims: int) -> nn.Module:
        # imported when first built: MONAI's import costs seconds every command would pay
        from models.nets import build_classifier

        return build_classifier(
            name, in_channels=in_channels, num_classes=num_classes, image_size=image_size,
            dims=dims,
        )

    return build


# ResNet-18/34 and DenseNet-121 (models.nets)
for _name in ("resnet18", "resnet34", "densenet121"):
    _REGISTRY[_name] = _field_network(_name)
MODEL_NAMES = tuple(_REGISTRY)
# each classifier's head: the parameters --encoder-lr-scale leaves at --lr
_HEADS = {"cnn": "head.", "resnet18": "fc.", "resnet34": "fc.", "densenet121": "class_layers."}


def _only_2d(name: str, dims: int, model: nn.Module) -> nn.Module:
    if dims != 2:
        raise ValueError(f"model {name!r} is 2D only, got dims={dims}; 3D: unet or autoencoder")
    return model


def build_model(
    name: str, *, in_channels: int, num_classes: int, image_size: int, dims: int = 2,
    **shape: Any,
) -> nn.Module:
    """The network called `name`, sized for the run's images and classes.

    Args:
        num_classes: classes of a classifier or GAN, mask classes (background included) of a
            U-Net; an autoencoder ignores it.
        dims: 2 (images, slices) or 3 (volumes; unet and autoencoder).
        shape: the U-Net's `width`, `depth` and `class_prior` (models.unet.UNet); other
            networks take none.

    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(_REGISTRY)}")
    if shape and name != "unet":
        raise ValueError(f"model {name!r} takes no {', '.join(shape)}; only unet does")
    return _REGISTRY[name](
        in_channels=in_channels, num_classes=num_classes, image_size=image_size, dims=dims,
        **shape,
    )


def classifier_head(name: str) -> str:
    """The parameter-name prefix of classifier `name`'s head (its last, linear layer)."""
    if name not in _HEADS:
        raise ValueError(f"{name!r} is not a classifier; classifiers: {', '.join(_HEADS)}")
    return _HEADS[name]
