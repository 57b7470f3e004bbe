"""Networks trained at hospital sites. Nothing here imports Flower."""

from __future__ import annotations

from torch import nn

from models.cnn import CNNClassifier

__all__ = ["CNNClassifier", "build_model"]


def build_model(name: str, *, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The network called `name`, sized for the run's images and classes."""
    if name == "cnn":
        return CNNClassifier(
            in_channels=in_channels, num_classes=num_classes, image_size=image_size
        )
    raise ValueError(f"unknown model {name!r}; available: cnn")
