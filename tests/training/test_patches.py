"""Random training patches of volumes and sliding-window inference (common.training.patches)."""

import copy

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from common.segmentation import overlap_metrics
from common.training import grad_sample  # noqa: F401  (medfed's Conv3d sampler, as training uses it)
from common.training.augment import augmented_pairs
from common.training.patches import (
    DRAWS,
    FOREGROUND_RATE,
    SlidingWindow,
    crop_patches,
    patch_draws,
    patch_start,
    patched,
    window_logits,
)
from common.training.tasks.segment import predict, segmentation_loss
from models.unet import UNet

VOLUME, PATCH = 32, 8


def _one_voxel_mask(where=(20, 10, 15)) -> torch.Tensor:
    mask = torch.zeros(VOLUME, VOLUME, VOLUME, dtype=torch.long)
    mask[where] = 1
    return mask


def _holds_foreground(mask: torch.Tensor, start: tuple[int, ...]) -> bool:
    window = tuple(slice(s, s + PATCH) for s in start)
    return bool(mask[window].any())


@pytest.mark.parametrize("rate", [FOREGROUND_RATE, 0.0, 1.0])
def test_patches_hold_foreground_at_the_requested_rate(rate):
    """One foreground voxel: the rate is `rate` plus what uniform patches catch by chance."""
    mask = _one_voxel_mask()
    draws = patch_draws(4000, torch.Generator().manual_seed(0))
    hits = [
        _holds_foreground(mask, patch_start(mask, PATCH, row, foreground_rate=rate))
        for row in draws
    ]
    # a uniform corner has VOLUME - PATCH + 1 = 25 places per axis, PATCH of which hold the voxel
    chance = (PATCH / (VOLUME - PATCH + 1)) ** 3
    expected = rate + (1 - rate) * chance
    # binomial sd at 4000 draws is <= 0.008: 0.025 is 3 sd, and a sampler that ignored the
    # rate (chance alone: 0.033) or always oversampled (1.0) is far outside it
    assert np.mean(hits) == pytest.approx(expected, abs=0.025)


def test_an_oversampled_patch_is_centred_on_its_foreground_voxel_and_stays_inside():
    draws = torch.zeros(DRAWS)  # draws[0] = 0 < rate: oversample
    assert patch_start(_one_voxel_mask((20, 10, 15)), PATCH, draws, foreground_rate=0.5) == (
        16, 6, 11
    )
    # near the edges the patch is moved inside the volume, never padded
    assert patch_start(_one_voxel_mask((0, 31, 2)), PATCH, draws, foreground_rate=0.5) == (
        0, 24, 0
    )


def test_oversampling_picks_a_class_first_so_a_small_structure_is_seen():
    """nnU-Net picks a class, then a voxel: a one-voxel class gets half the forced patches."""
    mask = torch.zeros(VOLUME, VOLUME, VOLUME, dtype=torch.long)
    mask[:16] = 1  # half the volume
    mask[28, 28, 28] = 2
    draws = patch_draws(2000, torch.Generator().manual_seed(1))
    small = [
        bool((mask[tuple(slice(s, s + PATCH) for s in
                         patch_start(mask, PATCH, row, foreground_rate=1.0))] == 2).any())
        for row in draws
    ]
    assert np.mean(small) == pytest.approx(0.5, abs=0.05)


def test_a_mask_without_foreground_gets_a_uniform_patch():
    mask = torch.zeros(VOLUME, VOLUME, VOLUME, dtype=torch.long)
    starts = [patch_start(mask, PATCH, row, foreground_rate=1.0)
              for row in patch_draws(500, torch.Generator().manual_seed(2))]
    corners = np.array(starts)
    assert corners.min() == 0 and corners.max() == VOLUME - PATCH
    assert abs(corners.mean() - (VOLUME - PATCH) / 2) < 1.0


def _volumes(n=4, size=16, seed=0):
    """Noisy grey volumes, each with a 4-voxel cube at its own place: class 1 bright, 2 dark.

    The classes differ in contrast to their surroundings, not in absolute intensity, which
    GroupNorm removes per sample.
    """
    rng = np.random.default_rng(seed)
    images = torch.as_tensor(0.4 + rng.random((n, 1, size, size, size)) * 0.2,
                             dtype=torch.float32)
    masks = torch.zeros(n, size, size, size, dtype=torch.long)
    for i in range(n):
        z, y, x = rng.integers(1, size - 5, 3)
        label = 1 + i % 2
        images[i, 0, z : z + 4, y : y + 4, x : x + 4] += 0.4 if label == 1 else -0.35
        masks[i, z : z + 4, y : y + 4, x : x + 4] = label
    return images, masks


def test_a_samples_patch_depends_on_its_own_mask_only():
    """Another sample's mask neither moves a patch nor changes the numbers drawn."""
    images, masks = _volumes()
    draws = patch_draws(len(images), torch.Generator().manual_seed(3))
    _, before = crop_patches(images, masks, PATCH, draws, foreground_rate=1.0)
    changed = masks.clone()
    changed[2] = 0
    changed[2, :3, :3, :3] = 1
    _, after = crop_patches(images, changed, PATCH, draws, foreground_rate=1.0)
    for i in (0, 1, 3):
        assert torch.equal(before[i], after[i])
    assert not torch.equal(before[2], after[2])
    assert before.shape == (4, PATCH, PATCH, PATCH)


def test_a_batchs_loss_is_the_mean_of_each_samples_loss_with_the_same_draws():
    torch.manual_seed(0)
    images, masks = _volumes()
    model = UNet(dims=3, num_classes=3, width=4, depth=1, image_size=PATCH)
    criterion = segmentation_loss(batch_dice=False)
    batch_loss = patched(criterion, PATCH, torch.Generator().manual_seed(4))(model, [images, masks])
    draws = patch_draws(len(images), torch.Generator().manual_seed(4))
    each = []
    for i in range(len(images)):
        x, y = crop_patches(images[i : i + 1], masks[i : i + 1], PATCH, draws[i : i + 1])
        each.append(float(criterion(model, [x, y]).detach()))
    assert float(batch_loss) == pytest.approx(np.mean(each), rel=1e-5)


def test_evaluation_sees_whole_volumes():
    images, masks = _volumes()
    seen = []

    def spy(model, batch):
        seen.append(batch[0].shape)
        return batch[0].sum()

    model = nn.Identity()
    loss = patched(spy, PATCH, torch.Generator().manual_seed(0))
    model.eval()
    loss(model, [images, masks])
    model.train()
    loss(model, [images, masks])
    assert seen == [images.shape, (4, 1, PATCH, PATCH, PATCH)]


@pytest.mark.parametrize("batch_dice", [False, True])
def test_per_sample_gradients_of_patched_augmented_volumes_are_each_samples_own(batch_dice):
    """Opacus's per-sample gradients through patches and augmentation equal each sample's own.

    Covers the 3D U-Net's layers under DP-SGD (Conv3d, ConvTranspose3d, GroupNorm). Batch Dice
    ties the samples together, and the same check then fails, as it must.
    """
    torch.manual_seed(0)
    images, masks = _volumes()
    model = UNet(dims=3, num_classes=3, width=8, depth=1, image_size=PATCH)
    reference = copy.deepcopy(model)
    seen: list[list[torch.Tensor]] = []
    criterion = segmentation_loss(batch_dice=batch_dice)

    def capture(m, batch):
        seen.append([t.detach().clone() for t in batch])
        return criterion(m, batch)

    generator = torch.Generator().manual_seed(5)
    loss = patched(augmented_pairs(capture, generator), PATCH, generator)
    wrapped = GradSampleModule(model, loss_reduction="mean")
    with pytest.warns(UserWarning, match="Full backward hook"):
        loss(wrapped, [images, masks]).backward()
    x, y = seen[0]
    assert x.shape == (4, 1, PATCH, PATCH, PATCH)
    plain = segmentation_loss(batch_dice=False)
    matches = []
    for i in range(len(x)):
        reference.zero_grad()
        plain(reference, [x[i : i + 1], y[i : i + 1]]).backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert p.grad_sample.shape[0] == 4, name
            matches.append(torch.allclose(p.grad_sample[i], q.grad, rtol=1e-3, atol=1e-6))
    assert all(matches) != batch_dice


def test_sliding_window_equals_whole_volume_where_one_window_holds_it():
    torch.manual_seed(0)
    model = UNet(dims=3, num_classes=3, width=4, depth=2, image_size=16).eval()
    images, _ = _volumes(n=2)
    with torch.no_grad():
        whole = model(images)
        windowed = window_logits(model, images, 16)
    assert torch.allclose(windowed, whole, atol=1e-5)


@pytest.mark.parametrize("size", [24, 20])
def test_sliding_window_puts_every_window_back_in_its_place(size):
    """A voxel-wise network gives the same logits from windows as from the whole volume.

    Any window placed at a wrong offset, or blended with weights that do not sum to one, shows.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 3, 1), nn.Tanh(), nn.Conv3d(3, 3, 1)).eval()
    images = torch.rand(2, 1, size, size, size)
    with torch.no_grad():
        assert torch.allclose(window_logits(model, images, PATCH), model(images), atol=1e-5)
        assert torch.allclose(SlidingWindow(model, PATCH)(images), model(images), atol=1e-5)


def test_a_unet_trained_on_patches_segments_whole_volumes_through_the_window():
    """Trained on 8-voxel patches of 16-voxel volumes, predicted whole with the window."""
    torch.manual_seed(0)
    images, masks = _volumes(n=16, seed=1)
    model = UNet(dims=3, num_classes=3, width=8, depth=1, image_size=PATCH)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = patched(segmentation_loss(batch_dice=True), PATCH, torch.Generator().manual_seed(0))
    model.train()
    for step in range(120):
        batch = slice(step % 4 * 4, step % 4 * 4 + 4)
        optimiser.zero_grad()
        loss(model, [images[batch], masks[batch]]).backward()
        optimiser.step()
    windowed = predict(model, images.numpy(), torch.device("cpu"), patch=PATCH)
    assert windowed.shape == masks.shape
    scores = overlap_metrics(windowed, masks.numpy(), 3)
    assert min(scores["dice-c1"], scores["dice-c2"]) > 0.8
