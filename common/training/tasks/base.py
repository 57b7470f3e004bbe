"""What every task's trainer provides, and how a site's folder is read. No Flower here.

A task turns a site's split into arrays (`load`), builds its network (`build`), trains it for
one round with or without DP-SGD (`train`), and scores the global model on local data
(`evaluate`). The ClientApp calls only this interface, so the four tasks share one privacy
path: the same PrivacyState, the same ledger, the same outbound guard.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.config import RunConfig
from common.data import Preprocess, SiteData
from common.privacy import PrivacyState
from common.sites import SiteRef
from common.training.loop import LocalTraining, LossFn, StepHooks, TrainReport, fit, fit_dp
from models import build_model

# (site, preprocessing, seed, split) -> the site's labelled images and labels of that split;
# how classification reads a site (a simulation wraps it with scanner shift and label flips)
SplitLoader = Callable[[SiteRef, Preprocess, int, str], tuple[np.ndarray, np.ndarray]]

# A task's samples of one split: arrays of equal length, images first.
Samples = tuple[np.ndarray, ...]

# A simulation worker hosts many virtual sites in turn; keep only the few most recent in memory.
_SITE_CACHE_SIZE = 2
_site_cache: OrderedDict[tuple[Path, Preprocess, bool, int, int], SiteData] = OrderedDict()


def folder_stamp(folder: Path) -> int:
    """A hash of every file's name, size and modification time under `folder`."""
    entries = []
    for where, _dirs, files in os.walk(folder):
        for name in files:
            try:
                info = os.stat(os.path.join(where, name))
            except OSError:
                continue
            entries.append((where, name, info.st_size, info.st_mtime_ns))
    return hash(tuple(sorted(entries)))


def site_data(site: SiteRef, pre: Preprocess, seed: int, *, masks: bool = False) -> SiteData:
    """The site folder's SiteData (kept for the next round: decoding is the slow part).

    Kept per seed (the seed draws the splits) and while no file in the folder changes: a site's
    worker lives across runs, and the hospital may add or replace images between them.
    """
    key = (site.data_dir.resolve(), pre, masks, seed, folder_stamp(site.data_dir))
    data = _site_cache.pop(key, None) or SiteData(site.data_dir, pre, seed=seed, masks=masks)
    _site_cache[key] = data
    while len(_site_cache) > _SITE_CACHE_SIZE:
        _site_cache.popitem(last=False)
    return data


def load_labelled(
    site: SiteRef, pre: Preprocess, seed: int, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """A site folder's labelled samples of `split`: how a real site reads its data."""
    arrays = site_data(site, pre, seed).split(split)
    keep = arrays.labels >= 0
    return arrays.images[keep], arrays.labels[keep]


@dataclass(frozen=True)
class Fit:
    """How one round of local training runs."""

    settings: LocalTraining
    device: torch.device
    privacy: PrivacyState | None  # None: no DP
    seed: int
    proximal: bool
    # classify under DP: the class counts logit adjustment uses, released with noise from the
    # site's validation split (client.validation); None: count the training labels (no DP) or
    # no adjustment (DP without a validation split)
    class_counts: np.ndarray | None = None
    # what the strategy adds to every step (SCAFFOLD's drift correction); None: nothing
    hooks: StepHooks | None = None

    def with_settings(self, **changes: Any) -> Fit:
        """The same round with some of its LocalTraining settings changed (a task's own)."""
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, **changes))

    def run(
        self, model: nn.Module, dataset: TensorDataset, loss_fn: LossFn,
        hooks: StepHooks | None = None,
    ) -> TrainReport:
        """Train `model` on `dataset`: DP-SGD when `privacy` is set, plain training otherwise.

        `hooks` are the task's own (a GAN's adversarial steps); they cannot be combined with
        the strategy's.
        """
        if hooks is not None and self.hooks is not None:
            raise ValueError(
                "this task adds its own step hooks and cannot train under --strategy scaffold"
            )
        hooks = hooks or self.hooks
        # Dropout and anything else drawing from torch's global generator draw from the round's
        # seed: a round gives the same draws in a fresh process (a simulation's worker) and in a
        # site's long-lived worker, whatever ran there before. DP-SGD's noise never comes from
        # here (common.training.loop seeds it from the operating system's entropy).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            if self.privacy is not None:
                return fit_dp(
                    model, dataset, loss_fn, settings=self.settings, device=self.device,
                    privacy=self.privacy, proximal=self.proximal, hooks=hooks,
                )
            return fit(
                model, dataset, loss_fn, settings=self.settings, device=self.device,
                seed=self.seed, proximal=self.proximal, hooks=hooks,
            )


class Task(Protocol):
    """A trainer for one `--task`."""

    name: str
    # metric names a site's train and evaluate replies may carry (the outbound guard's list)
    metrics: frozenset[str]

    def load(
        self, site: SiteRef, cfg: RunConfig, split: str, labelled: SplitLoader
    ) -> Samples:
        """The samples of `split` this task learns from or scores on."""
        ...

    def build(self, cfg: RunConfig) -> nn.Module:
        """The task's network for this run."""
        ...

    def releases(self, cfg: RunConfig) -> dict[str, float]:
        """Noisy statistics a DP run releases once each: name -> noise multiplier.

        They are planned into the site's budget (common.privacy.PrivacyState.release).
        """
        ...

    def train(self, model: nn.Module, samples: Samples, cfg: RunConfig, fit: Fit) -> TrainReport:
        """One round of local training (DP-SGD when `fit.privacy` is set)."""
        ...

    def evaluate(
        self, model: nn.Module, samples: Samples, cfg: RunConfig, device: torch.device
    ) -> dict[str, float]:
        """Metrics of `model` on the samples (loss and the task's own)."""
        ...


# The same for networks: a worker trains virtual site after virtual site on the same network, so
# it builds it once and loads each round's global weights into it.
_NETWORK_CACHE_SIZE = 2
_network_cache: OrderedDict[tuple[str, RunConfig], nn.Module] = OrderedDict()


def network(task: Task, cfg: RunConfig, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """`task`'s network for `cfg` holding `state` (built once per process, then reused).

    Everything a round can change is reset: every parameter and buffer comes from `state`
    (strictly), gradients are cleared, every parameter is trainable again and the module is
    back in training mode. Opacus's hooks and per-sample gradients are removed when each DP
    round ends (`fit_dp`).
    """
    key = (task.name, cfg)
    model = _network_cache.pop(key, None) or task.build(cfg)
    model.load_state_dict(state, strict=True)
    model.zero_grad(set_to_none=True)
    model.requires_grad_(True)  # as built: a round may have frozen some (--encoder-lr-scale 0)
    model.train()
    _network_cache[key] = model
    while len(_network_cache) > _NETWORK_CACHE_SIZE:
        _network_cache.popitem(last=False)
    return model


def preprocess(cfg: RunConfig) -> Preprocess:
    """The run's image preprocessing."""
    return Preprocess(image_size=cfg.image_size, channels=cfg.channels)


def build(cfg: RunConfig) -> nn.Module:
    """The run's network, as `models.build_model` sizes it."""
    return build_model(cfg.model, **cfg.network_args())


@torch.no_grad()
def batched(
    fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, device: torch.device,
    batch_size: int = 128,
) -> np.ndarray:
    """`fn` over images in batches, results concatenated as numpy."""
    parts = [
        fn(torch.as_tensor(images[i : i + batch_size], dtype=torch.float32).to(device))
        .cpu()
        .numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(parts) if parts else np.zeros((0,), dtype=np.float32)
