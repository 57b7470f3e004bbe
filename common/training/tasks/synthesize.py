"""Synthesis: a class-conditional DCGAN whose discriminator alone sees real images.

Privacy: the discriminator's loss on real images (real against fake, and its class head's
cross-entropy, both per image) is the only term that touches the site's data, so it alone goes
through DP-SGD (Opacus clips each real image's gradient and adds noise, and the
site's PrivacyState accounts the steps exactly as for a classifier). The discriminator's loss on
generated images, and the generator's whole update, depend on the site's data only through the
discriminator's (already private) weights: they are added after the noise, like FedProx's term,
and cost no privacy. Fake classes are drawn uniformly, never from the site's labels.

Unlabelled images (empty label) are class `num_classes`, "no class": the discriminator's
unconditional term, which every real image trains, judges them, their class head's loss is 0,
and the generator also learns to draw images without a class.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from opacus import GradSampleModule
from torch import nn
from torch.nn import functional as F  # noqa: N812

from common.config import RunConfig
from common.registry import Task
from common.sites import SiteRef
from common.training.loop import StepHooks, TrainReport, tensor_dataset
from common.training.tasks.base import Fit, Samples, SplitLoader, build, preprocess, site_data
from models.cgan import ConditionalGAN
from models.cgan_generator import ConditionalGenerator

# DCGAN's Adam settings (Radford et al., 2016), for both networks: less momentum than Adam's
# default 0.9, so neither network keeps moving in a direction the other has already answered
GENERATOR_BETAS = DISCRIMINATOR_BETAS = (0.5, 0.999)
# Weight of the class head's cross-entropy (AC-GAN) in the discriminator's loss on real images
# and in the generator's loss on its images.
CLASS_WEIGHT = 5.0
# Weight of the mode-seeking term (Mao et al., 2019) in the generator's loss. DP-SGD needs a
# discriminator that judges each image alone, and such a discriminator cannot see that the
# generator draws nearly the same image for every noise vector of a class (mode collapse: it
# did, and a classifier trained on its images learnt little). The term asks two noise vectors of
# one class to give images as far apart as the noise is. It touches no real image: no privacy
# cost.
MODE_SEEKING = 1.0


def gan_classes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Labels as the GAN's classes: an unlabelled image (-1) is class `num_classes`."""
    return np.where(labels < 0, num_classes, labels).astype(np.int64)


def class_loss(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of the class head; 0 for "no class" (unlabelled) samples."""
    num_classes = logits.shape[1]
    labelled = (classes < num_classes).to(logits.dtype)
    ce = F.cross_entropy(logits, classes.clamp(max=num_classes - 1), reduction="none")
    return ce * labelled


def real_loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """The discriminator's loss on real images (per sample, then the batch mean).

    Real against fake, plus CLASS_WEIGHT times its class head's cross-entropy on labelled ones.
    """
    images, classes = batch
    logits, class_logits = model(images, classes, class_logits=True)
    per_sample = F.binary_cross_entropy_with_logits(
        logits, torch.ones_like(logits), reduction="none"
    ) + CLASS_WEIGHT * class_loss(class_logits, classes)
    return per_sample.mean()


def mode_seeking_loss(
    first: torch.Tensor, second: torch.Tensor, z_first: torch.Tensor, z_second: torch.Tensor
) -> torch.Tensor:
    """The inverse of how far apart two batches of images are, per unit of noise distance.

    `first[i]` and `second[i]` are images of one class from noise `z_first[i]` and
    `z_second[i]`; the loss is small when different noise gives different images.
    """
    image_distance = (first - second).abs().flatten(1).mean(dim=1)
    noise_distance = (z_first - z_second).abs().mean(dim=1)
    return 1.0 / ((image_distance / noise_distance).mean() + 1e-5)


@contextmanager
def per_sample_hooks_off(model: nn.Module) -> Iterator[None]:
    """Forward and backward passes that Opacus must not record as per-sample gradients."""
    if isinstance(model, GradSampleModule):
        model.disable_hooks()
        try:
            yield
        finally:
            model.enable_hooks()
    else:
        yield


class AdversarialSteps(StepHooks):
    """The data-independent half of each GAN step: fakes for the discriminator, then G's step."""

    def __init__(
        self, generator: ConditionalGenerator, *, batch_size: int, lr: float,
        device: torch.device,
    ) -> None:
        self.generator = generator
        self.optimizer = torch.optim.Adam(generator.parameters(), lr=lr, betas=GENERATOR_BETAS)
        self.batch_size = batch_size
        self.device = device
        self.generator_losses: list[float] = []

    def _classes(self) -> torch.Tensor:
        """A batch of fake classes, uniform over the classes and "no class"."""
        return torch.randint(
            0, self.generator.num_classes + 1, (self.batch_size,), device=self.device
        )

    def _fakes(self) -> tuple[torch.Tensor, torch.Tensor]:
        classes = self._classes()
        return self.generator.sample(classes), classes

    def add_gradient(self, model: nn.Module) -> None:
        """Add the discriminator's gradient on generated images (labelled fake)."""
        params = [p for p in model.parameters() if p.requires_grad]
        with per_sample_hooks_off(model):
            fake, classes = self._fakes()
            logits = model(fake.detach(), classes)
            loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))
            # the class head is trained on real images only: no gradient here
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g

    def after_step(self, model: nn.Module) -> None:
        """One generator step: make the (private) discriminator call its images real.

        Two images per drawn class, from two noise vectors: both are judged, and the
        mode-seeking term keeps them apart.
        """
        self.optimizer.zero_grad(set_to_none=True)
        n, generator = self.batch_size, self.generator
        with per_sample_hooks_off(model):
            classes = self._classes().repeat(2)
            z = torch.randn(2 * n, generator.latent_dim, device=self.device)
            fake = generator(z, classes)
            logits, class_logits = model(fake, classes, class_logits=True)
            loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
            adversarial = loss + CLASS_WEIGHT * class_loss(class_logits, classes).mean()
            loss = adversarial + MODE_SEEKING * mode_seeking_loss(
                fake[:n], fake[n:], z[:n], z[n:]
            )
            grads = torch.autograd.grad(loss, list(self.generator.parameters()))
        for p, g in zip(self.generator.parameters(), grads, strict=True):
            p.grad = g
        self.optimizer.step()
        self.generator_losses.append(float(adversarial.detach()))


@torch.no_grad()
def discriminator_scores(
    gan: ConditionalGAN, images: np.ndarray, classes: np.ndarray, device: torch.device,
    *, seed: int = 0,
) -> dict[str, float]:
    """The discriminator's loss and accuracy on real images and as many generated ones."""
    gan.to(device).eval()
    if len(images) == 0:
        return {"loss": math.nan, "d-accuracy": math.nan}
    x = torch.as_tensor(images, dtype=torch.float32, device=device)
    c = torch.as_tensor(classes, device=device)
    rng = torch.Generator(device=device).manual_seed(seed)
    fake = gan.generator.sample(c, generator=rng)
    logits = torch.cat([gan.discriminator(x, c), gan.discriminator(fake, c)])
    target = torch.cat([torch.ones(len(x)), torch.zeros(len(x))]).to(device)
    loss = F.binary_cross_entropy_with_logits(logits, target)
    accuracy = ((logits > 0).float() == target).float().mean()
    return {"loss": float(loss), "d-accuracy": float(accuracy)}


class SynthesizeTask:
    """`--task synthesize`: a federated class-conditional GAN, DP on the discriminator."""

    name = Task.synthesize.value
    metrics = frozenset({"loss", "d-accuracy", "generator-loss"})

    def load(self, site: SiteRef, cfg: RunConfig, split: str, labelled: SplitLoader) -> Samples:
        """Every image of `split` and its GAN class (unlabelled: "no class")."""
        arrays = site_data(site, preprocess(cfg), cfg.seed).split(split)
        if len(arrays.labels) and int(arrays.labels.max()) >= cfg.num_classes:
            raise ValueError(
                f"site {site.name}: label {int(arrays.labels.max())} found but the run has "
                f"--num-classes {cfg.num_classes}; labels must be 0..{cfg.num_classes - 1}"
            )
        return arrays.images, gan_classes(arrays.labels, cfg.num_classes)

    def releases(self, cfg: RunConfig) -> dict[str, float]:
        """None: DP-SGD's steps are all this task spends."""
        return {}

    def build(self, cfg: RunConfig) -> nn.Module:
        """Generator and discriminator in one module."""
        return build(cfg)

    def train(self, model: nn.Module, samples: Samples, cfg: RunConfig, fit_: Fit) -> TrainReport:
        """Alternating discriminator (DP-SGD on real images) and generator steps."""
        if not isinstance(model, ConditionalGAN):
            raise TypeError(
                f"--task synthesize trains a ConditionalGAN, got {type(model).__name__}"
            )
        model.to(fit_.device)
        dataset = tensor_dataset(*samples, dtypes=(torch.float32, torch.long))
        steps = AdversarialSteps(
            model.generator, batch_size=fit_.settings.batch_size, lr=fit_.settings.lr,
            device=fit_.device,
        )
        report = fit_.with_settings(betas=DISCRIMINATOR_BETAS).run(
            model.discriminator, dataset, real_loss, hooks=steps
        )
        losses = steps.generator_losses
        g_loss = float(np.mean(losses)) if losses else math.nan
        return TrainReport(
            report.loss, report.num_examples, report.steps, report.seconds,
            extra={"generator-loss": g_loss},
        )

    def evaluate(
        self, model: nn.Module, samples: Samples, cfg: RunConfig, device: torch.device
    ) -> dict[str, float]:
        """The discriminator's loss and accuracy, real against generated."""
        if not isinstance(model, ConditionalGAN):
            raise TypeError(
                f"--task synthesize scores a ConditionalGAN, got {type(model).__name__}"
            )
        images, classes = samples
        return discriminator_scores(model, images, classes, device, seed=cfg.seed)
