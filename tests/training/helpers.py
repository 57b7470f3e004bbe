"""Tiny synthetic data the task tests share (CPU and CUDA)."""

from typing import Any

import numpy as np

SIZE, N = 16, 32


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """N images of SIZE x SIZE: faint noise, every second one with a bright 5x5 square.

    Returns images (N, 1, SIZE, SIZE), the squares' masks (N, SIZE, SIZE) and labels (N,).
    """
    rng = np.random.default_rng(seed)
    images = (rng.random((N, 1, SIZE, SIZE)) * 0.2).astype(np.float32)
    masks = np.zeros((N, SIZE, SIZE), np.int64)
    labels = np.arange(N) % 2
    for i in np.flatnonzero(labels):
        r, c = rng.integers(2, SIZE - 7, 2)
        images[i, 0, r : r + 5, c : c + 5] += 0.7
        masks[i, r : r + 5, c : c + 5] = 1
    return images, masks, labels


def clipped_norms(optimizer: Any) -> list[float]:
    """Each sample's gradient norm after Opacus's clipping, read from a DPOptimizer's params.

    For a spy on `DPOptimizer.clip_and_accumulate`: the norms it is about to accumulate. Poisson
    sampling can draw an empty batch (no per-sample gradients): that step clips nothing.
    """
    import torch

    if any(len(p.grad_sample) == 0 for p in optimizer.params):
        return []
    per_sample = torch.stack(
        [p.grad_sample.reshape(len(p.grad_sample), -1).norm(dim=1) for p in optimizer.params]
    ).norm(dim=0)
    factor = (optimizer.max_grad_norm / (per_sample + 1e-6)).clamp(max=1.0)
    return (per_sample * factor).tolist()
