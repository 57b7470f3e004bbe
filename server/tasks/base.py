"""What the aggregator does per task: initial weights, central evaluation, outputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from common.config import RunConfig
from models import build_model

StateDict = dict[str, torch.Tensor]
# global weights -> metrics of the global model on the central test set
Evaluator = Callable[[StateDict], dict[str, float]]


class CentralTask(Protocol):
    """The aggregator's side of one `--task`."""

    def initial_state(self, cfg: RunConfig) -> StateDict:
        """Seeded initial weights of the run's network."""
        ...

    def evaluator(self, cfg: RunConfig, site_dirs: Sequence[Path]) -> Evaluator | None:
        """Central evaluation on held-out images, or None without any."""
        ...

    def after_round(
        self, run_dir: Path, cfg: RunConfig, server_round: int, state: StateDict
    ) -> None:
        """Outputs written while the run goes on (a GAN's sample grids)."""
        ...

    def finish(
        self, run_dir: Path, cfg: RunConfig, state: StateDict, site_dirs: Sequence[Path]
    ) -> dict[str, float]:
        """Write the task's outputs for the final model; returns metrics to add to `final`."""
        ...


def build(cfg: RunConfig) -> torch.nn.Module:
    """The run's network."""
    return build_model(cfg.model, **cfg.network_args())


class DefaultSteps:
    """Seeded initial weights; nothing to write during or after the run."""

    def initial_state(self, cfg: RunConfig) -> StateDict:
        """The network's weights after seeding torch with the run's seed."""
        torch.manual_seed(cfg.seed)
        return build(cfg).state_dict()

    def after_round(
        self, run_dir: Path, cfg: RunConfig, server_round: int, state: StateDict
    ) -> None:
        """Nothing."""

    def finish(
        self, run_dir: Path, cfg: RunConfig, state: StateDict, site_dirs: Sequence[Path]
    ) -> dict[str, float]:
        """Nothing."""
        return {}
