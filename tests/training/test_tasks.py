"""Each task's trainer on tiny synthetic data: it learns, DP is applied and accounted."""

from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.privacy import PrivacyState, epsilon_of
from common.training.loop import LocalTraining, fit_dp, tensor_dataset
from common.training.tasks import Fit, get_task
from common.training.tasks.synthesize import (
    AdversarialSteps,
    class_loss,
    mode_seeking_loss,
    real_loss,
)
from tests.training.helpers import SIZE, N, blobs, clipped_norms


def _privacy(rounds=1, epochs=2, batch=8):
    return PrivacyState.plan(
        num_examples=N, batch_size=batch, rounds=rounds,
        steps_per_round=epochs * -(-N // batch), target_epsilon=8,
        delta=1e-5, accountant="rdp", max_grad_norm=1.0,
    )


@pytest.mark.parametrize("task", ["segment", "autoencode", "synthesize"])
def test_trainer_improves_its_loss(task):
    torch.manual_seed(0)
    images, masks, labels = blobs()
    samples = (images, masks) if task == "segment" else (images, labels)
    cfg = RunConfig(task=task, image_size=SIZE)
    trainer = get_task(task)
    model = trainer.build(cfg)
    settings = LocalTraining(epochs=4, batch_size=8, lr=3e-3)
    first = trainer.train(model, samples, cfg, Fit(settings, torch.device("cpu"), None, 0, False))
    later = trainer.train(model, samples, cfg, Fit(settings, torch.device("cpu"), None, 1, False))
    if task == "synthesize":  # adversarial losses do not fall monotonically; both must move
        assert np.isfinite(later.loss) and np.isfinite(later.extra["generator-loss"])
        assert later.loss != pytest.approx(first.loss)
    else:
        assert later.loss < first.loss
    assert later.steps == 4 * (N // 8)
    metrics = trainer.evaluate(model, samples, cfg, torch.device("cpu"))
    assert set(metrics) <= trainer.metrics


@pytest.mark.parametrize("task", ["segment", "autoencode", "synthesize"])
def test_dp_training_is_accounted_like_the_classifier(task):
    images, masks, labels = blobs()
    samples = (images, masks) if task == "segment" else (images, labels)
    cfg = RunConfig(task=task, image_size=SIZE)
    trainer = get_task(task)
    privacy = _privacy()
    report = trainer.train(
        trainer.build(cfg), samples, cfg,
        Fit(LocalTraining(epochs=2, batch_size=8), torch.device("cpu"), privacy, 0, False),
    )
    assert privacy.steps == report.steps == 2 * (N // 8)
    assert privacy.epsilon() == pytest.approx(
        epsilon_of([(privacy.noise_multiplier, privacy.sample_rate, privacy.steps)],
                   delta=1e-5, accountant="rdp"), rel=1e-9)
    assert privacy.epsilon() <= 8 + 1e-6


def test_gan_discriminator_per_sample_gradients_are_clipped(monkeypatch):
    """DP on the discriminator: each real image's gradient is clipped before the noise."""
    from opacus.optimizers import DPOptimizer

    images, _, labels = blobs()
    cfg = RunConfig(task="synthesize", image_size=SIZE)
    gan = get_task("synthesize").build(cfg)
    norms: list[float] = []
    original = DPOptimizer.clip_and_accumulate

    def spy(self):
        norms.extend(clipped_norms(self))
        assert self.max_grad_norm == pytest.approx(0.05)
        return original(self)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy)
    privacy = _privacy()
    privacy.max_grad_norm = 0.05
    steps = AdversarialSteps(gan.generator, batch_size=8, lr=1e-3, device=torch.device("cpu"))
    before = {k: v.clone() for k, v in gan.generator.state_dict().items()}
    fit_dp(
        gan.discriminator, tensor_dataset(images, labels, dtypes=(torch.float32, torch.long)),
        real_loss, settings=LocalTraining(epochs=1, batch_size=8), device=torch.device("cpu"),
        privacy=privacy, hooks=steps,
    )
    assert norms and max(norms) <= 0.05 + 1e-6
    assert len(steps.generator_losses) == N // 8  # one generator step per DP step
    assert any(not torch.equal(before[k], v) for k, v in gan.generator.state_dict().items())


def test_segment_skips_a_mask_whose_geometry_does_not_match(tmp_path):
    import nibabel as nib

    from common.sites import SiteRef
    from common.training.tasks.base import site_data

    site = tmp_path / "site"
    (site / "img").mkdir(parents=True)
    lines = ["path,label,mask,split"]
    for i, shape in enumerate([(16, 16), (16, 16), (16, 16)]):
        nib.save(nib.Nifti1Image(np.random.rand(*shape).astype(np.float32), np.eye(4)),
                 site / "img" / f"i{i}.nii.gz")
        mask_shape = (12, 16) if i == 2 else shape
        nib.save(nib.Nifti1Image(np.zeros(mask_shape, np.uint8), np.eye(4)),
                 site / "img" / f"m{i}.nii.gz")
        lines.append(f"img/i{i}.nii.gz,{i % 2},img/m{i}.nii.gz,train")
    (site / "labels.csv").write_text("\n".join(lines) + "\n")
    ref = SiteRef("site", site, tmp_path / "state")
    cfg = RunConfig(task="segment", image_size=SIZE)
    images, masks = get_task("segment").load(ref, cfg, "train", lambda *a: (None, None))
    assert len(images) == len(masks) == 2
    problems = site_data(ref, site_data(ref, *_pre(cfg)).pre, cfg.seed, masks=True).problems
    assert any("geometry does not match" in p.reason and p.path == "img/m2.nii.gz"
               for p in problems)


def _pre(cfg):
    from common.training.tasks.base import preprocess
    return preprocess(cfg), cfg.seed


def test_segmentation_loss_of_a_batch_is_the_mean_of_each_sample_loss():
    # DP-SGD clips each sample's gradient: no sample's loss may depend on its batch mates
    from common.training.tasks.segment import segmentation_loss
    from models.unet import UNet

    torch.manual_seed(0)
    images, masks, _ = blobs()
    model = UNet(image_size=SIZE, depth=2)
    x, y = torch.as_tensor(images[:6]), torch.as_tensor(masks[:6])
    loss = segmentation_loss(batch_dice=False)
    whole = loss(model, [x, y])
    each = torch.stack([loss(model, [x[i : i + 1], y[i : i + 1]]) for i in range(6)])
    assert torch.allclose(whole, each.mean(), atol=1e-5)
    # batch Dice (no DP) ties the samples together: not a mean of per-sample losses
    batch = segmentation_loss(batch_dice=True)
    each_batch = torch.stack([batch(model, [x[i : i + 1], y[i : i + 1]]) for i in range(6)])
    assert not torch.allclose(batch(model, [x, y]), each_batch.mean(), atol=1e-3)


def test_segmentation_loss_is_monais_dice_ce_with_nnunets_smoothing():
    from monai.losses import DiceLoss

    from common.training.tasks.segment import dice_ce

    torch.manual_seed(0)
    masks = torch.zeros((3, SIZE, SIZE), dtype=torch.long)
    masks[1, 4:9, 4:9] = 1
    masks[2, 10:20, 2:12] = 2
    logits = torch.randn((3, 3, SIZE, SIZE))
    ce = torch.nn.functional.cross_entropy(logits, masks)
    probs = torch.softmax(logits, 1)
    target = torch.nn.functional.one_hot(masks, 3).movedim(-1, 1).float()
    # Dice by hand, per sample and foreground class; an absent class scores 0 (smooth_nr 0)
    inter = (probs * target)[:, 1:].sum((2, 3))
    total = (probs + target)[:, 1:].sum((2, 3))
    dice = 1 - 2 * inter / (total + 1e-5)
    expected = ce + dice.mean()
    got = dice_ce(batch_dice=False)(logits, masks.unsqueeze(1))
    assert torch.allclose(got, expected, atol=1e-5)
    monai_dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True,
                          smooth_nr=0.0, smooth_dr=1e-5)(logits, masks.unsqueeze(1))
    assert torch.allclose(got - ce, monai_dice, atol=1e-6)


def test_dice_of_a_class_a_sample_lacks_teaches_nothing():
    # a normal image's Dice term would push "less structure everywhere" on every normal image,
    # which under DP-SGD's noise drowns the lesion images; only cross-entropy speaks there
    from common.training.tasks.segment import dice_ce

    masks = torch.zeros((1, 1, SIZE, SIZE), dtype=torch.long)
    logits = torch.randn((1, 2, SIZE, SIZE), requires_grad=True)
    dice_only = dice_ce(batch_dice=False)
    dice_only.lambda_ce = 0.0
    loss = dice_only(logits, masks)
    loss.backward()
    assert float(loss) == pytest.approx(1.0)
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def test_unet_head_bias_encodes_the_class_prior():
    from models.unet import UNet

    model = UNet(image_size=SIZE, depth=2, num_classes=3, class_prior=[0.6, 0.3, 0.1])
    probs = torch.softmax(model.head.bias.detach(), dim=0)
    assert torch.allclose(probs, torch.tensor([0.6, 0.3, 0.1]), atol=1e-6)
    with pytest.raises(ValueError, match="class_prior"):
        UNet(image_size=SIZE, num_classes=3, class_prior=[0.5, 0.5])


@pytest.mark.parametrize("task", ["classify", "segment", "autoencode", "synthesize"])
def test_a_reused_network_trains_exactly_like_a_fresh_one(task):
    from common.training.tasks.base import network

    images, masks, labels = blobs()
    samples = (images, masks) if task == "segment" else (images, labels)
    cfg = RunConfig(task=task, image_size=SIZE)
    trainer = get_task(task)
    torch.manual_seed(3)
    start = {k: v.clone() for k, v in trainer.build(cfg).state_dict().items()}
    settings = LocalTraining(epochs=1, batch_size=8, lr=3e-3)
    cpu = torch.device("cpu")

    # a worker's previous site: a DP round that leaves its own weights, grads and mode behind
    used = network(trainer, cfg, start)
    trainer.train(used, samples, cfg, Fit(settings, cpu, _privacy(), 0, False))
    used.eval()
    again = network(trainer, cfg, start)
    assert again is used  # built once per worker
    assert again.training and all(p.grad is None for p in again.parameters())
    assert not any(hasattr(p, "grad_sample") for p in again.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in again.modules())
    for k, v in again.state_dict().items():
        assert torch.equal(v, start[k]), k

    fresh = trainer.build(cfg)
    fresh.load_state_dict(start)
    torch.manual_seed(7)
    trainer.train(fresh, samples, cfg, Fit(settings, cpu, None, 5, False))
    torch.manual_seed(7)
    trainer.train(again, samples, cfg, Fit(settings, cpu, None, 5, False))
    for (k, a), b in zip(again.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_networks_of_other_runs_are_built_anew():
    from common.training.tasks.base import network

    small, large = RunConfig(image_size=16), RunConfig(image_size=32)
    task = get_task("classify")
    a = network(task, small, task.build(small).state_dict())
    b = network(task, large, task.build(large).state_dict())
    assert a is not b
    assert network(task, small, task.build(small).state_dict()) is a


def _chest_like(side=64, seed=0):
    """A dark 'lung' field in a brighter body, with noise: (1, 1, side, side)."""
    rng = np.random.default_rng(seed)
    image = np.full((side, side), 0.7, np.float32)
    image[side // 4 : 3 * side // 4, side // 8 : side // 2] = 0.2
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    return torch.as_tensor(image)[None, None]


def _with_spot(image, contrast, row=32, col=20, size=5):
    out = image.clone()
    out[..., row : row + size, col : col + size] += contrast
    return out


def test_anomaly_score_ranks_a_bright_spot_above_a_normal_image():
    from common.training.tasks.autoencode import anomaly_map

    normal = _chest_like()
    background = torch.full_like(normal, 0.5)  # a poor reconstruction, the same for both
    lesion = _with_spot(normal, 0.5)
    dark = _with_spot(normal, -0.5)  # darker than its surroundings: not a nodule
    scores = anomaly_map(torch.cat([normal, lesion, dark]), background.expand(3, -1, -1, -1))
    peak = scores.flatten(1).amax(dim=1)
    assert peak[1] > 2 * peak[0] and peak[2] <= peak[0] + 1e-6


def test_anomaly_map_ignores_a_flat_offset_and_dilutes_an_edge():
    from common.training.tasks.autoencode import anomaly_map

    image = _chest_like()
    reconstruction = image.clone()
    # a site's intensities the model reconstructs 0.3 too dark everywhere: nothing stands out
    shifted = anomaly_map(image, reconstruction - 0.3)
    assert torch.allclose(shifted, anomaly_map(image, reconstruction), atol=1e-5)
    # a missed edge of the same contrast as a missed spot scores lower than the spot
    edge = reconstruction.clone()
    edge[..., :, 40:] -= 0.5
    spot = _with_spot(reconstruction, -0.5, row=30, col=44)  # spot the model left out
    assert anomaly_map(image, edge).amax() < 0.6 * anomaly_map(image, spot).amax()


def test_anomaly_scores_of_a_model_are_its_maps_largest_values():
    from common.training.tasks.autoencode import anomaly_map, anomaly_scores

    class Constant(torch.nn.Module):  # reconstructs every image as the same grey
        def forward(self, x):
            return torch.full_like(x, 0.5)

    images = torch.cat([_chest_like(seed=1), _with_spot(_chest_like(seed=2), 0.4)])
    scores = anomaly_scores(Constant(), images.numpy(), torch.device("cpu"))
    expected = anomaly_map(images, torch.full_like(images, 0.5)).flatten(1).amax(dim=1)
    assert scores.shape == (2,) and np.allclose(scores, expected.numpy(), atol=1e-6)
    assert scores[1] > scores[0]


def test_spot_target_is_the_anomaly_maps_cell_maximum_held_fixed():
    from common.training.tasks.autoencode import SPOT_SCALE, anomaly_map, spot_target

    image = _with_spot(_chest_like(), 0.5, row=40, col=8)
    reconstruction = _chest_like().requires_grad_(True)  # it left the spot out
    target = spot_target(image, reconstruction, torch.Size((8, 8)))
    assert target.shape == (1, 1, 8, 8) and not target.requires_grad
    expected = torch.nn.functional.max_pool2d(anomaly_map(image, reconstruction.detach()), 8)
    assert torch.allclose(target, expected * SPOT_SCALE)
    assert divmod(int(target.flatten().argmax()), 8) == (5, 1)  # the cell holding the spot


def test_spot_term_teaches_the_encoder_where_lesions_are_without_labels():
    """Unlabelled training; then the spot head's peak ranks held-out lesions above normals."""
    from sklearn.metrics import roc_auc_score

    from common.training.tasks.autoencode import spot_loss
    from models import build_model

    def images(seed, n=64):
        rng = np.random.default_rng(seed)
        out, labels = [], np.arange(n) % 2
        for i, label in enumerate(labels):
            image = _chest_like(32, seed=seed * 1000 + i)
            if label:
                row, col = rng.integers(9, 21), rng.integers(5, 12)
                image = _with_spot(image, rng.uniform(0.3, 0.5), row=row, col=col, size=3)
            out.append(image)
        return torch.cat(out), labels

    torch.manual_seed(0)
    model = build_model("autoencoder", in_channels=1, num_classes=2, image_size=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    train, _ = images(seed=1)
    for step in range(100):
        batch = train[(step * 16) % len(train) :][:16]
        optimizer.zero_grad()
        spot_loss(0.1)(model, (batch,)).backward()
        optimizer.step()
    test, labels = images(seed=2)
    with torch.no_grad():
        _, spots = model(test, spots=True)
    assert roc_auc_score(labels, spots.flatten(1).amax(dim=1).numpy()) > 0.9


@pytest.mark.parametrize("dp", [False, True])
@pytest.mark.parametrize("weight", [0.0, 0.1])
def test_spot_weight_trains_the_spot_head_or_leaves_it(dp, weight):
    """--spot-weight 0: the spot head gets no gradient and stays; > 0: it learns, DP or not."""
    images, _, labels = blobs()
    cfg = RunConfig(task="autoencode", image_size=SIZE, spot_weight=weight)
    trainer = get_task("autoencode")
    model = trainer.build(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    privacy = _privacy() if dp else None
    trainer.train(
        model, (images, labels), cfg,
        Fit(LocalTraining(epochs=2, batch_size=8), torch.device("cpu"), privacy, 0, False),
    )
    after = model.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert "encoder.0.0.weight" in moved
    assert ("spot_head.weight" in moved) == (weight > 0)
    if privacy is not None:
        assert privacy.steps == 2 * (N // 8) and privacy.epsilon() <= 8 + 1e-6


def test_spot_weight_is_an_autoencoder_setting():
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="--spot-weight"):
        RunConfig(task="autoencode", spot_weight=-0.1)
    with pytest.raises(ConfigError, match="--spot-weight"):
        RunConfig(task="classify", spot_weight=0.1)


def test_gan_class_loss_skips_unlabelled_images():
    logits = torch.tensor([[2.0, -1.0], [2.0, -1.0], [2.0, -1.0]])
    loss = class_loss(logits, torch.tensor([0, 1, 2]))  # 2: "no class"
    assert loss[0] < loss[1] and loss[2] == 0


def test_mode_seeking_loss_is_lowest_when_noise_moves_the_image():
    z1, z2 = torch.zeros(4, 8), torch.ones(4, 8)
    same = torch.rand(4, 1, SIZE, SIZE)
    apart = same + 0.3
    assert mode_seeking_loss(same, same, z1, z2) > 1e4  # one image for all noise: collapse
    assert mode_seeking_loss(same, apart, z1, z2) == pytest.approx(1 / 0.3, rel=1e-3)
    assert mode_seeking_loss(same, apart, z1, 3 * z2) == pytest.approx(3 / 0.3, rel=1e-3)


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_generator_steps_pull_a_collapsed_generator_apart(monkeypatch, weight):
    """A generator that ignores its noise learns to use it: with the mode-seeking term, fast."""
    import common.training.tasks.synthesize as synthesize

    monkeypatch.setattr(synthesize, "MODE_SEEKING", weight)
    torch.manual_seed(0)
    gan = get_task("synthesize").build(RunConfig(task="synthesize", image_size=SIZE))
    with torch.no_grad():  # collapse: the first layer's weights on the noise are zero
        gan.generator.project[0].weight[:, : gan.generator.latent_dim] = 0
    steps = AdversarialSteps(gan.generator, batch_size=16, lr=1e-3, device=torch.device("cpu"))
    for _ in range(20):
        steps.after_step(gan.discriminator)
    with torch.no_grad():
        spread = gan.generator.sample(torch.ones(64, dtype=torch.long)).std(0).mean()
    # the adversarial loss alone moves those weights too, but leaves the images close together
    assert (spread > 0.08) if weight else (spread < 0.05)
    assert all(np.isfinite(steps.generator_losses))


def test_gan_discriminator_learns_the_class_from_real_images():
    """The class head (what tells the generator a lesion means class 1) learns from real data."""
    torch.manual_seed(0)
    images, _, labels = blobs()
    cfg = RunConfig(task="synthesize", image_size=SIZE)
    gan = get_task("synthesize").build(cfg)
    x, y = torch.as_tensor(images), torch.as_tensor(labels)
    optimizer = torch.optim.Adam(gan.discriminator.parameters(), lr=3e-3)
    for _ in range(40):
        optimizer.zero_grad()
        real_loss(gan.discriminator, (x, y)).backward()
        optimizer.step()
    gan.eval()
    _, logits = gan.discriminator(x, y, class_logits=True)
    assert (logits.argmax(1) == y).float().mean() >= 0.9


@pytest.mark.parametrize("dp", [False, True])
@pytest.mark.parametrize("scale", [0.0, 0.1])
def test_encoder_lr_scale_slows_or_freezes_the_feature_blocks(dp, scale):
    """--encoder-lr-scale: 0 leaves every feature weight as it came (only the head trains)."""
    images, _, labels = blobs()
    trainer = get_task("classify")
    torch.manual_seed(0)
    start = trainer.build(RunConfig(image_size=SIZE)).state_dict()
    moved = {}
    for s in (1.0, scale):
        cfg = RunConfig(image_size=SIZE, encoder_lr_scale=s)
        model = trainer.build(cfg)
        model.load_state_dict(start)
        fit = Fit(LocalTraining(epochs=2, batch_size=8, lr=3e-3), torch.device("cpu"),
                  _privacy() if dp else None, 0, False)
        report = trainer.train(model, (images, labels), cfg, fit)
        assert np.isfinite(report.loss)
        after = model.state_dict()
        moved[s] = {
            part: max(float((after[k] - start[k]).abs().max()) for k in start
                      if k.startswith(part))
            for part in ("features.", "head.")
        }
        assert all(p.requires_grad == (s > 0 or not n.startswith("features."))
                   for n, p in model.named_parameters())
    assert moved[scale]["head."] > 0
    if scale == 0:
        assert moved[scale]["features."] == 0
    else:  # Adam moves each weight by about lr a step: a tenth of the rate, about a tenth
        assert 0 < moved[scale]["features."] < 0.5 * moved[1.0]["features."]


def test_encoder_lr_scale_is_a_classifier_setting():
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="--encoder-lr-scale"):
        RunConfig(encoder_lr_scale=-1)
    with pytest.raises(ConfigError, match="--encoder-lr-scale"):
        RunConfig(task="autoencode", encoder_lr_scale=0)
    settings = LocalTraining(lr=0.01, lr_scales=(("features.", 0.1),))
    model = get_task("classify").build(RunConfig(image_size=SIZE))
    lrs = sorted(g["lr"] for g in settings.make_optimizer(model).param_groups)
    assert lrs == pytest.approx([0.001, 0.01])


def test_a_sites_decoded_images_are_kept_per_seed_and_until_a_file_changes(
    tmp_path: Path,
) -> None:
    """A site's worker lives across runs: a new seed or a changed folder is read afresh."""
    from common.sites import SiteRef
    from common.training.tasks.base import preprocess, site_data
    from tests.simulations.conftest import write_easy_site

    write_easy_site(tmp_path / "site", 20, 0.5, np.random.default_rng(0))
    ref = SiteRef("site", tmp_path / "site", tmp_path / "state")
    pre = preprocess(RunConfig(image_size=32))
    first = site_data(ref, pre, 0)
    assert site_data(ref, pre, 0) is first
    assert site_data(ref, pre, 1) is not first
    labels = tmp_path / "site" / "labels.csv"
    labels.write_text(labels.read_text().replace(",val\n", ",train\n", 1))
    assert site_data(ref, pre, 0) is not first
