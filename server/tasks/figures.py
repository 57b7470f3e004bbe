"""PNG figures of a task's outputs (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(path: Path, rows: list[np.ndarray], row_titles: list[str], title: str) -> Path:
    """Rows of (N, C, H, W) images in [0, 1], one row per array, first channel shown."""
    plt = _pyplot()
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(
        len(rows), cols, figsize=(1.3 * cols, 1.4 * len(rows)), squeeze=False,
        constrained_layout=True,
    )
    for i, (images, name) in enumerate(zip(rows, row_titles, strict=True)):
        for j in range(cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(images):
                ax.imshow(images[j][0], cmap="gray", vmin=0, vmax=1)
        axes[i][0].set_title(name, fontsize=8, loc="left")
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def overlays(
    path: Path, images: np.ndarray, truth: np.ndarray, predicted: np.ndarray, title: str
) -> Path:
    """Images with the true mask's outline (green) and the predicted one (red)."""
    plt = _pyplot()
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(2.0 * n, 2.3), squeeze=False, constrained_layout=True)
    for j in range(n):
        ax = axes[0][j]
        ax.axis("off")
        ax.imshow(images[j][0], cmap="gray", vmin=0, vmax=1)
        if truth[j].any():
            ax.contour(truth[j] > 0, levels=[0.5], colors="lime", linewidths=0.8)
        if predicted[j].any():
            ax.contour(predicted[j] > 0, levels=[0.5], colors="red", linewidths=0.8)
    fig.suptitle(f"{title} (green: true, red: predicted)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
