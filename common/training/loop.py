"""Local training at a hospital site: plain SGD or DP-SGD through Opacus. No Flower here.

DP-SGD notes that matter for the privacy guarantee:
- The noise multiplier comes from the site's `PrivacyState`, calibrated once for the whole run, and
  the accountant's history is carried across rounds, so epsilon is cumulative.
- Batches are Poisson-sampled (Opacus's DPDataLoader), which the accountant's analysis assumes.
- The noise generator is seeded from the operating system's entropy, never from the run's seed:
  the aggregator knows the run seed, and noise it could regenerate would protect nothing.
- FedProx's proximal gradient mu * (w - w_global) is added to the gradient after Opacus has
  clipped and noised it, right before the optimiser step. It is data-independent, so this costs
  no privacy; added to the loss it would be silently dropped, because Opacus builds the gradient
  from per-sample gradients of the data loss only. Without DP this is exactly FedProx.
"""

from __future__ import annotations

import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.metrics import classification_metrics
from common.privacy import PrivacyState
from common.training import grad_sample  # noqa: F401  (registers the fast convolution sampler in Opacus)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cuda` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was requested but no CUDA GPU is available; use cpu")
    return torch.device(name)


@dataclass(frozen=True)
class LocalTraining:
    """Hyper-parameters of one round of local training."""

    epochs: int = 1
    # > 0: exactly this many optimiser steps, cycling through the data as often as that takes
    # (`epochs` is then ignored); 0: `epochs` passes over the data
    steps: int = 0
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 3e-4
    momentum: float = 0.9  # SGD only
    betas: tuple[float, float] = (0.9, 0.999)  # Adam only
    proximal_mu: float = 0.0
    # (parameter-name prefix, multiple of `lr`) pairs: parameters under a prefix learn at that
    # rate, and a multiple of 0 freezes them (requires_grad off, so under DP-SGD their
    # gradients are neither computed, clipped nor noised). Empty: every parameter at `lr`.
    lr_scales: tuple[tuple[str, float], ...] = ()

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """A fresh optimiser for one round (its state never crosses rounds or sites).

        With `lr_scales`, also sets each parameter's requires_grad (before Opacus wraps the
        model, which hooks only trainable layers).
        """
        params: list[dict[str, Any]] | Iterator[nn.Parameter] = model.parameters()
        if self.lr_scales:
            params = self._param_groups(model)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas)
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        raise ValueError(f"--optimizer must be adam or sgd, got {self.optimizer!r}")

    def _param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        groups: dict[float, list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            scale = next((s for prefix, s in self.lr_scales if name.startswith(prefix)), 1.0)
            p.requires_grad_(scale > 0)
            if scale > 0:
                groups.setdefault(scale, []).append(p)
        return [{"params": ps, "lr": self.lr * scale} for scale, ps in groups.items()]


@dataclass(frozen=True)
class TrainReport:
    """What one round of local training did."""

    loss: float
    num_examples: int
    steps: int
    seconds: float
    # a task's own training metrics beyond the loss (a GAN's generator loss)
    extra: Mapping[str, float] = field(default_factory=dict)


# The loss of one batch: the mean over its samples of a per-sample loss. A loss that couples
# samples (a Dice over the whole batch) would make Opacus's per-sample gradients wrong and the
# DP guarantee void, so every task's loss is computed per sample and then averaged.
LossFn = Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor]


class StepHooks:
    """What a task adds to each optimiser step beyond the gradient of its data loss.

    `add_gradient` runs after Opacus has clipped and noised the data gradient (after
    `backward` without DP) and before the step: only gradients that do not depend on the
    site's data may be added there (FedProx's term, a GAN discriminator's loss on generated
    images), or that depend on it only through gradients already privatised (SCAFFOLD's
    correction). `after_step` runs after each step (a GAN's generator update).
    """

    def add_gradient(self, model: nn.Module) -> None:
        """Add data-independent gradients to `model`'s parameters' `.grad`."""

    def after_step(self, model: nn.Module) -> None:
        """Anything to do after the step."""


def tensor_dataset(*arrays: np.ndarray, dtypes: Sequence[torch.dtype]) -> TensorDataset:
    """A TensorDataset of equally long arrays; no samples at all is an error a site can read."""
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"arrays of different lengths {sorted(lengths)}: one entry per sample")
    if lengths == {0}:
        raise ValueError("no training images at this site")
    return TensorDataset(
        *(torch.as_tensor(a, dtype=d) for a, d in zip(arrays, dtypes, strict=True))
    )


def labelled_dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    """Images (float32) and their integer labels as one TensorDataset."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return tensor_dataset(images, labels, dtypes=(torch.float32, torch.long))


def _cross_entropy(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _batches(loader: DataLoader, settings: LocalTraining) -> Iterator[Sequence[torch.Tensor]]:
    """The round's batches: `settings.steps` of them, or `settings.epochs` passes."""
    if settings.steps <= 0:
        for _ in range(settings.epochs):
            yield from loader
        return
    given = 0
    while True:
        for batch in loader:
            yield batch
            given += 1
            if given == settings.steps:
                return


def _run_round(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    settings: LocalTraining,
    device: torch.device,
    global_params: Mapping[str, torch.Tensor] | None,
    loss_fn: LossFn,
    hooks: StepHooks,
) -> tuple[float, int]:
    """Train for the round's steps or epochs; returns (mean loss per sample, optimiser steps)."""
    params = dict(model.named_parameters())
    total_loss, seen, steps = 0.0, 0, 0
    model.train()
    for batch in _batches(loader, settings):
        optimizer.zero_grad(set_to_none=True)
        n = len(batch[0])
        if n == 0:
            # Poisson sampling can draw an empty batch. Without DP there is nothing to learn
            # from; with DP the step must still happen (noise only) and be accounted, or
            # whether a batch was empty would leak and the ledger would under-count steps.
            if isinstance(optimizer, DPOptimizer):
                _empty_grad_samples(optimizer)
            else:
                continue
        else:
            batch = [t.to(device, non_blocking=True) for t in batch]
            loss = loss_fn(model, batch)
            loss.backward()
            total_loss += float(loss.detach()) * n
            seen += n
        if isinstance(optimizer, DPOptimizer):
            # What DPOptimizer.step does, with data-independent gradients added after the
            # noise.
            if not optimizer.pre_step():
                continue
            hooks.add_gradient(model)
            _add_proximal_gradient(params, global_params, settings.proximal_mu)
            optimizer.original_optimizer.step()
        else:
            hooks.add_gradient(model)
            _add_proximal_gradient(params, global_params, settings.proximal_mu)
            optimizer.step()
        hooks.after_step(model)
        steps += 1
    return (total_loss / seen if seen else float("nan")), steps


def _empty_grad_samples(optimizer: DPOptimizer) -> None:
    # Opacus clips and sums per-sample gradients; zero samples sum to zero, then noise is added.
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


@torch.no_grad()
def _add_proximal_gradient(
    params: dict[str, nn.Parameter],
    anchor: Mapping[str, torch.Tensor] | None,
    mu: float,
) -> None:
    if anchor is None or mu <= 0:
        return
    for name, reference in anchor.items():
        p = params[name]
        if p.grad is not None:
            p.grad.add_(p - reference, alpha=mu)


def fit(
    model: nn.Module,
    dataset: TensorDataset,
    loss_fn: LossFn,
    *,
    settings: LocalTraining,
    device: torch.device,
    seed: int = 0,
    proximal: bool = False,
    hooks: StepHooks | None = None,
) -> TrainReport:
    """Plain (non-private) local training of `model` on `dataset` with `loss_fn`.

    Args:
        proximal: anchor the FedProx term at the weights `model` holds on entry.

    """
    started = time.perf_counter()
    model.to(device)
    anchor = _snapshot(model) if proximal else None
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = settings.make_optimizer(model)
    loss, steps = _run_round(
        model, optimizer, loader, settings, device, anchor, loss_fn, hooks or StepHooks()
    )
    return TrainReport(loss, len(dataset), steps, time.perf_counter() - started)


def fit_dp(
    model: nn.Module,
    dataset: TensorDataset,
    loss_fn: LossFn,
    *,
    settings: LocalTraining,
    device: torch.device,
    privacy: PrivacyState,
    proximal: bool = False,
    hooks: StepHooks | None = None,
) -> TrainReport:
    """DP-SGD local training; appends this round's steps to `privacy.history`.

    `model` must be a fresh module (Opacus hooks are attached here and removed on exit). Its own
    parameters are trained in place, so its state dict has no `_module.` prefix afterwards.
    `loss_fn` and `hooks` are called with Opacus's wrapper of `model`.
    """
    started = time.perf_counter()
    model.to(device)
    anchor = _snapshot(model) if proximal else None
    engine = PrivacyEngine(accountant=privacy.accountant)
    engine.accountant.history = list(privacy.history)
    optimizer = settings.make_optimizer(model)
    # Opacus turns this into Poisson sampling at rate 1 / len(loader): the rate the plan assumed,
    # and the accountant records the rate actually used if the site's data changed since.
    loader = DataLoader(dataset, batch_size=settings.batch_size)
    noise_generator = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    private_model, private_opt, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=privacy.noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise_generator,
    )
    try:
        with warnings.catch_warnings():
            # Opacus's hooks fire on module outputs because images do not require grad: expected.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss, steps = _run_round(
                private_model, private_opt, private_loader, settings, device, _prefixed(anchor),
                loss_fn, hooks or StepHooks(),
            )
    finally:
        private_model._close()
    privacy.record(engine.accountant.history)
    return TrainReport(loss, len(dataset), steps, time.perf_counter() - started)


def train_local(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    settings: LocalTraining,
    device: torch.device,
    seed: int = 0,
    proximal: bool = False,
) -> TrainReport:
    """Plain (non-private) local training of a classifier (cross-entropy).

    Args:
        proximal: anchor the FedProx term at the weights `model` holds on entry.

    """
    return fit(
        model, labelled_dataset(images, labels), _cross_entropy, settings=settings, device=device,
        seed=seed, proximal=proximal,
    )


def train_local_dp(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    settings: LocalTraining,
    device: torch.device,
    privacy: PrivacyState,
    proximal: bool = False,
) -> TrainReport:
    """DP-SGD local training of a classifier; see `fit_dp`."""
    return fit_dp(
        model, labelled_dataset(images, labels), _cross_entropy, settings=settings, device=device,
        privacy=privacy, proximal=proximal,
    )


def _prefixed(anchor: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    # Opacus's GradSampleModule names parameters `_module.<name>`.
    return None if anchor is None else {f"_module.{k}": v for k, v in anchor.items()}


@torch.no_grad()
def predict(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 256,
) -> tuple[np.ndarray, float]:
    """Class probabilities (N, classes) of `model` on labelled images, and the mean loss."""
    model.to(device).eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total, chunks = 0.0, []
    for start in range(0, len(labels), batch_size):
        x = torch.as_tensor(images[start : start + batch_size], dtype=torch.float32).to(device)
        y = torch.as_tensor(labels[start : start + batch_size], dtype=torch.long).to(device)
        logits = model(x)
        total += float(criterion(logits, y))
        chunks.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    n = len(labels)
    probs = np.concatenate(chunks) if chunks else np.zeros((0, 2), dtype=np.float32)
    return probs, (total / n if n else float("nan"))


def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    device: torch.device,
    threshold: float | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Loss and classification metrics of `model` on labelled images.

    Args:
        threshold: a binary classifier's operating point on P(positive) (None: 0.5).

    """
    probs, loss = predict(model, images, labels, device=device, batch_size=batch_size)
    metrics = classification_metrics(probs, np.asarray(labels), threshold=threshold)
    metrics["loss"] = loss
    return metrics
