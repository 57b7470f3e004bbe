"""`--task segment --dims 3` end to end at one site: patches, DP-SGD, sliding-window scores."""

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer

from common.config import RunConfig
from common.privacy import PrivacyState, epsilon_of
from common.training.loop import LocalTraining
from common.training.tasks import Fit, get_task
from tests.training.helpers import clipped_norms

SIZE, PATCH, N = 16, 8, 12


def _volumes(seed=0):
    """N noisy volumes, each with a bright 5-voxel cube (label 1) at its own place."""
    rng = np.random.default_rng(seed)
    images = (0.4 + rng.random((N, 1, SIZE, SIZE, SIZE)) * 0.2).astype(np.float32)
    masks = np.zeros((N, SIZE, SIZE, SIZE), np.int64)
    for i in range(N):
        z, y, x = rng.integers(1, SIZE - 6, 3)
        images[i, 0, z : z + 5, y : y + 5, x : x + 5] += 0.4
        masks[i, z : z + 5, y : y + 5, x : x + 5] = 1
    return images, masks


def _cfg(**kw):
    return RunConfig(task="segment", dims=3, image_size=SIZE, patch_size=PATCH, **kw)


def test_a_dp_sgd_round_on_volume_patches_is_clipped_per_sample_and_accounted(monkeypatch):
    samples = _volumes()
    cfg = _cfg()
    trainer = get_task("segment")
    model = trainer.build(cfg)
    assert model.dims == 3
    privacy = PrivacyState.plan(
        num_examples=N, batch_size=4, rounds=1, steps_per_round=6, target_epsilon=8,
        delta=1e-5, accountant="rdp", max_grad_norm=0.5,
    )
    norms: list[float] = []
    shapes: list[tuple[int, ...]] = []
    original = DPOptimizer.clip_and_accumulate

    def spy(self):
        norms.extend(clipped_norms(self))
        shapes.extend(tuple(p.grad_sample.shape[1:]) for p in self.params[:1])
        return original(self)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = trainer.train(
        model, samples, cfg,
        Fit(LocalTraining(steps=6, batch_size=4), torch.device("cpu"), privacy, 0, False),
    )
    assert privacy.steps == report.steps == 6
    assert privacy.epsilon() == pytest.approx(
        epsilon_of([(privacy.noise_multiplier, privacy.sample_rate, privacy.steps)],
                   delta=1e-5, accountant="rdp"), rel=1e-9)
    assert norms and max(norms) <= 0.5 + 1e-6
    assert shapes and all(s == (8, 1, 3, 3, 3) for s in shapes)  # the first Conv3d
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    metrics = trainer.evaluate(model, samples, cfg, torch.device("cpu"))
    assert {"dice", "loss", "hd95", "nsd"} <= set(metrics) <= trainer.metrics


def test_a_3d_unet_learns_from_patches_and_scores_whole_volumes():
    torch.manual_seed(0)
    samples = _volumes()
    cfg = _cfg(dp=False)
    trainer = get_task("segment")
    model = trainer.build(cfg)
    cpu = torch.device("cpu")
    settings = LocalTraining(steps=40, batch_size=4, lr=1e-2)
    first = trainer.evaluate(model, samples, cfg, cpu)
    for seed in range(2):
        trainer.train(model, samples, cfg, Fit(settings, cpu, None, seed, False))
    later = trainer.evaluate(model, samples, cfg, cpu)
    assert later["loss"] < first["loss"]
    assert later["dice"] > 0.7


def test_the_clipping_spy_reads_an_empty_poisson_batch_as_no_step():
    # Poisson sampling may draw no sample at all: a step with nothing to clip, not an error
    class Param:
        grad_sample = torch.zeros(0, 3, 3)

    class Optimizer:
        params = [Param()]
        max_grad_norm = 1.0

    assert clipped_norms(Optimizer()) == []
