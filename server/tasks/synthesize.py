"""Synthesis at the aggregator: FID and train-on-synthetic/test-on-real AUC, sample grids.

Both metrics use a reference CNN trained on real images (no download: the aggregator trains it
once per run and keeps it in RUN_DIR): in simulation on the sites' pooled training splits (as
`medfed central` does), deployed on half of `--test-data`. FID is the Frechet distance of
generated and held-out images in that CNN's pooled features. TSTR trains the same CNN recipe on
generated images only, as many per class as the real training set has, and reports its AUC on
the held-out images next to the real-trained CNN's (`trtr_auc`) and their ratio.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common.config import RunConfig
from common.data import Preprocess, SiteData
from common.frechet import frechet_distance
from common.modelfile import load_torch_file
from common.training.loop import LocalTraining, evaluate, resolve_device, train_local
from models import build_model
from models.cgan import ConditionalGAN
from models.cnn import CNNClassifier
from server.heldout import held_out
from server.tasks.base import DefaultSteps, Evaluator, StateDict, build
from server.tasks.figures import image_grid

log = logging.getLogger("medfed.server")

SAMPLES = "samples"
REFERENCE = "reference-classifier.pt"
GRID_ROUNDS = 5  # sample grids written over the run
PER_CLASS_SHOWN = 8
REFERENCE_EPOCHS = 15
REFERENCE_SETTINGS = LocalTraining(epochs=1, batch_size=32, lr=1e-3)


def _labelled(parts: list[tuple[SiteData, str]]) -> tuple[np.ndarray, np.ndarray]:
    arrays = [d.split(s) for d, s in parts]
    if not arrays:
        return np.zeros((0,)), np.zeros((0,), np.int64)
    images = np.concatenate([a.images for a in arrays])
    labels = np.concatenate([a.labels for a in arrays])
    keep = labels >= 0
    return images[keep], labels[keep]


def train_classifier(
    cfg: RunConfig, images: np.ndarray, labels: np.ndarray, seed: int
) -> CNNClassifier:
    """The reference recipe: the run's CNN, REFERENCE_EPOCHS epochs of Adam, no DP."""
    torch.manual_seed(seed)
    model = build_model("cnn", in_channels=cfg.channels, num_classes=cfg.num_classes,
                        image_size=cfg.image_size)
    assert isinstance(model, CNNClassifier)  # internal: the registry's "cnn"
    device = resolve_device(cfg.device)
    for epoch in range(REFERENCE_EPOCHS):
        train_local(model, images, labels, settings=REFERENCE_SETTINGS, device=device,
                    seed=seed + epoch)
    return model.cpu().eval()


@torch.no_grad()
def features(model: CNNClassifier, images: np.ndarray) -> np.ndarray:
    """The CNN's pooled features (the layer before its head), (N, D)."""
    x = torch.as_tensor(images, dtype=torch.float32)
    return model.pool(model.features(x)).numpy()


@torch.no_grad()
def generate(
    state: StateDict, cfg: RunConfig, classes: np.ndarray, seed: int
) -> np.ndarray:
    """Images of `classes` from the generator in `state`."""
    gan = build(cfg)
    assert isinstance(gan, ConditionalGAN)  # internal: --task synthesize builds one
    gan.load_state_dict(state)
    gan.eval()
    rng = torch.Generator().manual_seed(seed)
    out = [
        gan.generator.sample(torch.as_tensor(classes[i : i + 256]), generator=rng).numpy()
        for i in range(0, len(classes), 256)
    ]
    return np.concatenate(out) if out else np.zeros((0, cfg.channels, cfg.image_size,
                                                     cfg.image_size), np.float32)


class Reference:
    """The real-data yardstick: a CNN, its training labels and the held-out test images."""

    def __init__(self, cfg: RunConfig, site_dirs: Sequence[Path], run_dir: Path) -> None:
        test = _labelled(held_out(cfg, site_dirs))
        pre = Preprocess(image_size=cfg.image_size, channels=cfg.channels)
        if site_dirs:
            unique = dict.fromkeys(Path(d).resolve() for d in site_dirs)
            train = _labelled([(SiteData(d, pre, seed=cfg.seed), "train") for d in unique])
            self.test_images, self.test_labels = test
        else:  # deployed: only --test-data is here; half trains the yardstick
            order = np.random.default_rng(cfg.seed).permutation(len(test[1]))
            half = len(order) // 2
            train = (test[0][order[:half]], test[1][order[:half]])
            self.test_images, self.test_labels = test[0][order[half:]], test[1][order[half:]]
        self.train_labels = train[1]
        path = run_dir / REFERENCE
        self.model = build_model("cnn", in_channels=cfg.channels, num_classes=cfg.num_classes,
                                 image_size=cfg.image_size)
        if path.is_file():
            self.model.load_state_dict(load_torch_file(path, what="reference classifier"))
        else:
            log.info("training the reference classifier on %d real images", len(train[1]))
            self.model = train_classifier(cfg, train[0], train[1], seed=cfg.seed)
            torch.save(self.model.state_dict(), path)
        assert isinstance(self.model, CNNClassifier)  # internal: built as "cnn"
        self.cnn: CNNClassifier = self.model
        self.test_features = features(self.cnn, self.test_images)
        self.trtr_auc = evaluate(self.cnn, self.test_images, self.test_labels,
                                 device=torch.device("cpu"))["auc"]


class SynthesizeCentral(DefaultSteps):
    """`fid` every round; `tstr_auc`, `trtr_auc`, `tstr_ratio` at the end; sample grids."""

    def __init__(self) -> None:
        self._reference: Reference | None = None

    def reference(self, cfg: RunConfig, site_dirs: Sequence[Path]) -> Reference | None:
        """The yardstick, trained once per run; None without labelled held-out images."""
        if self._reference is None:
            if not held_out(cfg, site_dirs):
                return None
            self._reference = Reference(cfg, site_dirs, Path(cfg.out))
            if len(self._reference.test_labels) < 2:
                return None
        return self._reference

    def evaluator(self, cfg: RunConfig, site_dirs: Sequence[Path]) -> Evaluator | None:
        """FID of generated images (held-out class mix) against the held-out images."""
        reference = self.reference(cfg, site_dirs)
        if reference is None:
            return None

        def evaluate_gan(state: StateDict) -> dict[str, float]:
            fake = generate(state, cfg, reference.test_labels, seed=cfg.seed)
            fid = frechet_distance(features(reference.cnn, fake), reference.test_features)
            return {"fid": fid, "num-examples": float(len(fake))}

        return evaluate_gan

    def after_round(
        self, run_dir: Path, cfg: RunConfig, server_round: int, state: StateDict
    ) -> None:
        """A sample grid (one row per class, the last "no class") every rounds/5 rounds."""
        every = max(1, cfg.rounds // GRID_ROUNDS)
        if server_round % every and server_round != cfg.rounds:
            return
        rows = [
            generate(state, cfg, np.full(PER_CLASS_SHOWN, c), seed=cfg.seed)
            for c in range(cfg.num_classes + 1)
        ]
        names = [f"class {c}" for c in range(cfg.num_classes)] + ["no class"]
        image_grid(run_dir / SAMPLES / f"round-{server_round:03d}.png", rows, names,
                   f"Generated images after round {server_round}")

    def finish(
        self, run_dir: Path, cfg: RunConfig, state: StateDict, site_dirs: Sequence[Path]
    ) -> dict[str, float]:
        """Train the reference recipe on generated images only; its AUC on real ones."""
        reference = self.reference(cfg, site_dirs)
        if reference is None:
            return {}
        classes = reference.train_labels
        fake = generate(state, cfg, classes, seed=cfg.seed + 1)
        model = train_classifier(cfg, fake, classes, seed=cfg.seed)
        tstr = evaluate(model, reference.test_images, reference.test_labels,
                        device=torch.device("cpu"))["auc"]
        trtr = float(reference.trtr_auc)
        return {"tstr_auc": tstr, "trtr_auc": trtr,
                "tstr_ratio": tstr / trtr if trtr > 0 else float("nan")}
