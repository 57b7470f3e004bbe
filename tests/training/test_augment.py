"""Per-sample augmentation: each image its own transform, nothing at evaluation, DP-compatible."""

import numpy as np
import torch

from common.privacy import PrivacyState
from common.training.augment import augment_batch, augmented
from common.training.loop import LocalTraining, fit_dp, labelled_dataset
from models.cnn import CNNClassifier


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 32, 32, generator=g)
    x[:, :, 8:20, 4:12] += 3.0  # an off-centre structure, so flips and shifts show
    return x


def test_each_sample_gets_its_own_transform_from_its_own_image_only() -> None:
    x = _images()
    same = x[:1].repeat(6, 1, 1, 1)
    out = augment_batch(same, torch.Generator().manual_seed(1))
    assert out.shape == same.shape
    assert len({round(float(o.sum()), 3) for o in out}) == 6  # six different transforms
    changed = x.clone()
    changed[3] = torch.randn(1, 32, 32)
    a = augment_batch(x, torch.Generator().manual_seed(2))
    b = augment_batch(changed, torch.Generator().manual_seed(2))
    keep = [i for i in range(6) if i != 3]
    torch.testing.assert_close(a[keep], b[keep])  # no sample's output depends on another's
    assert not torch.equal(a[3], b[3])


def test_transforms_are_light() -> None:
    x = _images(64)
    out = augment_batch(x, torch.Generator().manual_seed(3))
    # the structure stays in the image and the intensity scale stays about the same
    assert abs(float(out.mean() - x.mean())) < 0.2
    assert 0.8 < float(out.std() / x.std()) < 1.2


def test_evaluation_sees_the_images_as_they_are() -> None:
    torch.manual_seed(0)
    model = CNNClassifier(in_channels=1, num_classes=2, image_size=32, width=8, depth=2).eval()
    y = torch.zeros(6, dtype=torch.long)

    def plain(m: torch.nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

    loss = augmented(plain, torch.Generator().manual_seed(4))
    x = _images()
    assert torch.equal(loss(model, [x, y]), plain(model, [x, y]))
    model.train()
    assert not torch.equal(loss(model, [x, y]), plain(model, [x, y]))


def test_dp_sgd_trains_through_the_augmentation() -> None:
    torch.manual_seed(0)
    model = CNNClassifier(in_channels=1, num_classes=2, image_size=32, width=8, depth=2)
    images = _images(16).numpy()
    labels = np.arange(16) % 2

    def plain(m: torch.nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

    privacy = PrivacyState(noise_multiplier=1.0, sample_rate=0.5, planned_steps=3,
                           target_epsilon=1e9, delta=1e-5, accountant="rdp", max_grad_norm=1.0)
    report = fit_dp(model, labelled_dataset(images, labels),
                    augmented(plain, torch.Generator().manual_seed(5)),
                    settings=LocalTraining(steps=3, batch_size=8), device=torch.device("cpu"),
                    privacy=privacy)
    assert report.steps == 3 and np.isfinite(report.loss)
    assert len(privacy.history) == 1


def _pairs(n: int = 6, dims: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    shape = (n, 1, *([16] * (dims - 2)), 32, 32) if dims == 3 else (n, 1, 32, 32)
    x = torch.randn(shape, generator=g)
    masks = torch.zeros((n, *shape[2:]), dtype=torch.long)
    masks[..., 8:20, 4:12] = 1
    masks[..., 22:28, 20:30] = 2
    x = x + 3.0 * (masks > 0).unsqueeze(1)  # the structures are where the masks say
    return x, masks


def test_a_mask_moves_with_its_image_and_keeps_its_labels() -> None:
    from common.training.augment import augment_pairs

    x, masks = _pairs()
    moved, moved_masks = augment_pairs(x, masks, torch.Generator().manual_seed(4))
    assert moved_masks.dtype == masks.dtype
    assert set(moved_masks.unique().tolist()) <= {0, 1, 2}  # never a blended label
    assert not torch.equal(moved_masks, masks)
    for image, mask in zip(moved, moved_masks, strict=True):
        inside = image[0][mask > 0].mean()
        outside = image[0][mask == 0].mean()
        assert inside - outside > 2.0  # the structure is still under its moved label


def test_paired_augmentation_is_per_sample_in_2d_and_3d() -> None:
    from common.training.augment import augment_pairs

    for dims in (2, 3):
        x, masks = _pairs(dims=dims)
        changed = x.clone()
        changed[2] = torch.randn(changed[2].shape)
        a, ma = augment_pairs(x, masks, torch.Generator().manual_seed(5))
        b, mb = augment_pairs(changed, masks, torch.Generator().manual_seed(5))
        keep = [i for i in range(6) if i != 2]
        torch.testing.assert_close(a[keep], b[keep])
        assert torch.equal(ma, mb)  # the masks' transforms do not depend on any image


def test_dp_sgd_segments_through_paired_augmentation() -> None:
    from common.training.augment import augmented_pairs
    from common.training.loop import tensor_dataset
    from common.training.tasks.segment import segmentation_loss
    from models.unet import UNet

    x, masks = _pairs(n=16)
    model = UNet(image_size=32, depth=2, num_classes=3)
    privacy = PrivacyState.plan(num_examples=16, batch_size=8, rounds=1, steps_per_round=2,
                                target_epsilon=8.0, delta=1e-5, accountant="rdp",
                                max_grad_norm=1.0)
    loss = augmented_pairs(segmentation_loss(batch_dice=False), torch.Generator().manual_seed(0))
    dataset = tensor_dataset(x.numpy(), masks.numpy(), dtypes=(torch.float32, torch.long))
    report = fit_dp(model, dataset, loss, settings=LocalTraining(steps=2, batch_size=8),
                    device=torch.device("cpu"), privacy=privacy)
    assert report.steps == 2 and np.isfinite(report.loss)
