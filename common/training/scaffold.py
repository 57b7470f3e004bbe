"""A site's side of SCAFFOLD: correct each step's gradient, then update its control variate.

Privacy. The correction c - c_i is added after Opacus has clipped and noised the data gradient,
and c_i is updated to the mean of the gradients this round actually used (option I of the paper,
taken along the local trajectory instead of with an extra pass). Under DP those are the noisy
gradients that DP-SGD releases step by step and the accountant already charges, so c_i and the
delta c_i that leaves the site are post-processing: no privacy cost beyond the training's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.atomic import atomic_open
from common.training.loop import StepHooks

# Opacus's GradSampleModule names parameters `_module.<name>`
_OPACUS_PREFIX = "_module."


def _plain(name: str) -> str:
    return name[len(_OPACUS_PREFIX):] if name.startswith(_OPACUS_PREFIX) else name


class DriftCorrection(StepHooks):
    """Add c - c_i to every step's gradient; average the gradients used (the new c_i).

    Args:
        server: c, by state-dict name (what the aggregator sent).
        site: this site's c_i from its last round in this run (empty: zeros, the first round).

    """

    def __init__(self, server: Mapping[str, np.ndarray], site: Mapping[str, np.ndarray]) -> None:
        self.server = {k: np.asarray(v, dtype=np.float32) for k, v in server.items()}
        self.site = {
            k: np.asarray(site.get(k, np.zeros_like(v)), dtype=np.float32)
            for k, v in self.server.items()
        }
        for k, v in self.site.items():
            if v.shape != self.server[k].shape:
                raise ValueError(
                    f"SCAFFOLD control variate {k!r} has shape {v.shape} at this site but "
                    f"{self.server[k].shape} from the aggregator: the run's network changed; "
                    "start a new run"
                )
        self._correction: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add_gradient(self, model: nn.Module) -> None:
        """Record the gradient the step would use, then correct it."""
        self.steps += 1
        for name, p in model.named_parameters():
            key = _plain(name)
            if p.grad is None or key not in self.server:
                continue
            if key not in self._correction:
                self._correction[key] = torch.as_tensor(
                    self.server[key] - self.site[key], device=p.grad.device
                )
                self._sums[key] = torch.zeros_like(p.grad)
            self._sums[key] += p.grad.detach()
            p.grad.add_(self._correction[key])

    def updated(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(the new c_i, its change delta c_i) over every entry of c.

        Entries no step trained (buffers, frozen layers) keep their c_i and change by zero, so
        every site replies with the same names.
        """
        new = dict(self.site)
        if self.steps:
            for key, total in self._sums.items():
                new[key] = (total / self.steps).cpu().numpy().astype(np.float32)
        delta = {k: (new[k] - self.site[k]).astype(np.float32) for k in self.server}
        return new, delta


def control_path(state_dir: Path, run_key: str) -> Path:
    """Where a site keeps its c_i for one run."""
    return state_dir / "scaffold" / f"{run_key}.npz"


def load_control(path: Path) -> dict[str, np.ndarray]:
    """A site's saved c_i (empty before its first round); never unpickles."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as saved:
            return {k: saved[k] for k in saved.files}
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"SCAFFOLD state {path} cannot be read ({exc}); delete it to restart this site's "
            "control variate from zero"
        ) from exc


def save_control(path: Path, control: Mapping[str, np.ndarray]) -> None:
    """Write c_i atomically (a crash mid-write leaves the previous round's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = dict(control)
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)
