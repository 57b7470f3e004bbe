import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from common.privacy import PrivacyState
from common.training.loop import (
    LocalTraining,
    evaluate,
    resolve_device,
    train_local,
    train_local_dp,
)
from models.cnn import CNNClassifier

CPU = torch.device("cpu")


def _model(seed: int = 0) -> CNNClassifier:
    torch.manual_seed(seed)
    return CNNClassifier(in_channels=1, num_classes=2, image_size=16, width=8, depth=2, dropout=0)


def _data(n: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.normal(0, 1, (n, 1, 16, 16)).astype(np.float32)
    images[labels == 1, :, 4:12, 4:12] += 1.5  # a learnable "lesion"
    return images, labels


def _distance(model: torch.nn.Module, start: list[torch.Tensor]) -> float:
    return sum(
        float((p.detach() - s).norm()) for p, s in zip(model.parameters(), start, strict=True)
    )


def _privacy(n: int, batch: int, *, sigma: float, clip: float) -> PrivacyState:
    return PrivacyState(
        noise_multiplier=sigma, sample_rate=batch / n, planned_steps=1, target_epsilon=1e9,
        delta=1e-5, accountant="rdp", max_grad_norm=clip,
    )


def test_dp_without_noise_or_clipping_equals_a_plain_sgd_step() -> None:
    images, labels = _data(16)
    settings = LocalTraining(epochs=1, batch_size=16, optimizer="sgd", lr=0.1, momentum=0.0)
    plain, private = _model(), _model()
    train_local(plain, images, labels, settings=settings, device=CPU)
    # sample rate 1: Poisson sampling includes every image, so both take one full-batch step
    train_local_dp(
        private, images, labels, settings=settings, device=CPU,
        privacy=_privacy(16, 16, sigma=0.0, clip=1e9),
    )
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), private.state_dict().items(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name


def test_clipping_bounds_the_update() -> None:
    images, labels = _data(16)
    images *= 50  # huge gradients
    clip, lr = 0.01, 1.0
    model = _model()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train_local_dp(
        model, images, labels,
        settings=LocalTraining(batch_size=16, optimizer="sgd", lr=lr, momentum=0.0),
        device=CPU, privacy=_privacy(16, 16, sigma=0.0, clip=clip),
    )
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    # mean of per-sample gradients each clipped to norm <= clip has norm <= clip
    assert float((after - before).norm()) <= lr * clip * (1 + 1e-4)
    assert float((after - before).norm()) > 0


def test_cumulative_epsilon_over_rounds_matches_one_accountant() -> None:
    images, labels = _data(40)
    state = PrivacyState.plan(
        num_examples=40, batch_size=10, rounds=3, steps_per_round=4, target_epsilon=8,
        delta=1e-5, accountant="rdp", max_grad_norm=1.0,
    )
    for _ in range(3):  # a fresh model (and PrivacyEngine) every round, as a site does
        train_local_dp(
            _model(), images, labels, settings=LocalTraining(batch_size=10), device=CPU,
            privacy=state,
        )
    assert state.steps == state.planned_steps == 12
    one = RDPAccountant()
    one.history = [(state.noise_multiplier, state.sample_rate, 12)]
    assert state.epsilon() == pytest.approx(one.get_epsilon(1e-5), rel=1e-9)
    assert 7.5 < state.epsilon() <= 8.0


def test_dp_noise_is_not_reproducible_from_the_run_seed() -> None:
    images, labels = _data(16)
    results = []
    for _ in range(2):
        torch.manual_seed(0)  # even with the global seed fixed, noise must differ
        model = _model()
        train_local_dp(
            model, images, labels, settings=LocalTraining(batch_size=16, momentum=0),
            device=CPU, privacy=_privacy(16, 16, sigma=1.0, clip=1.0),
        )
        results.append(next(model.parameters()).detach().clone())
    assert not torch.equal(results[0], results[1])


def test_proximal_term_pulls_towards_the_global_model() -> None:
    images, labels = _data(32)
    drift = {}
    for mu in (0.0, 10.0):
        model = _model()
        start = [p.detach().clone() for p in model.parameters()]
        train_local(
            model, images, labels, device=CPU, proximal=mu > 0,
            settings=LocalTraining(epochs=5, batch_size=8, lr=0.01, proximal_mu=mu),
        )
        drift[mu] = _distance(model, start)
    assert drift[10.0] < drift[0.0]


def test_training_learns_a_separable_task() -> None:
    images, labels = _data(64)
    model = _model()
    before = evaluate(model, images, labels, device=CPU)
    train_local(
        model, images, labels, device=CPU,
        settings=LocalTraining(epochs=15, batch_size=16, lr=0.01),
    )
    after = evaluate(model, images, labels, device=CPU)
    assert after["loss"] < before["loss"]
    assert after["auc"] > 0.9


def test_proximal_term_also_acts_under_dp() -> None:
    images, labels = _data(32)
    drift = {}
    for mu in (0.0, 50.0):
        model = _model()
        start = [p.detach().clone() for p in model.parameters()]
        train_local_dp(
            model, images, labels, device=CPU, proximal=mu > 0,
            privacy=_privacy(32, 8, sigma=0.0, clip=1.0),
            settings=LocalTraining(
                epochs=5, batch_size=8, optimizer="sgd", lr=0.05, proximal_mu=mu
            ),
        )
        drift[mu] = _distance(model, start)
    assert drift[50.0] < 0.5 * drift[0.0]


def test_device_resolution() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_empty_site_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no training images"):
        train_local(
            _model(), np.zeros((0, 1, 16, 16), np.float32), np.zeros(0, np.int64),
            settings=LocalTraining(), device=CPU,
        )


def test_empty_poisson_batches_are_noised_and_accounted() -> None:
    # 4 examples at batch size 1: each Poisson batch is empty with probability (3/4)^4 ~ 0.32,
    # so 30 steps are all but certain to include empty ones. Every one of them must still be a
    # noisy step in the ledger, or epsilon is under-counted.
    images, labels = _data(4)
    privacy = _privacy(4, 1, sigma=1.0, clip=1.0)
    settings = LocalTraining(epochs=30, batch_size=1, optimizer="sgd", lr=0.1, momentum=0.0)
    model = _model()
    start = [p.detach().clone() for p in model.parameters()]
    report = train_local_dp(
        model, images, labels, settings=settings, device=CPU, privacy=privacy
    )
    assert report.steps == 30 * 4
    assert privacy.steps == 30 * 4
    assert _distance(model, start) > 0
