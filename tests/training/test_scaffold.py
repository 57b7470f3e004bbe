"""SCAFFOLD at the site: the drift correction, the control variate it keeps, its privacy."""

from pathlib import Path

import numpy as np
import pytest
import torch

from common.privacy import PrivacyState
from common.training.loop import LocalTraining, fit, fit_dp, labelled_dataset
from common.training.scaffold import DriftCorrection, control_path, load_control, save_control
from models.cnn import CNNClassifier

CPU = torch.device("cpu")
ONE_STEP = LocalTraining(steps=1, batch_size=16, optimizer="sgd", lr=0.1, momentum=0.0)


def _model() -> CNNClassifier:
    torch.manual_seed(0)
    return CNNClassifier(in_channels=1, num_classes=2, image_size=16, width=8, depth=2, dropout=0)


def _data(n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    images = rng.normal(0, 1, (n, 1, 16, 16)).astype(np.float32)
    images[labels == 1, :, 4:12, 4:12] += 1.5
    return images, labels


def _ce(model: torch.nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _gradient(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    model = _model()
    _ce(model, [torch.from_numpy(images), torch.from_numpy(labels)]).backward()
    return {k: p.grad.numpy().copy() for k, p in model.named_parameters()}  # type: ignore[union-attr]


def _train(
    hooks: DriftCorrection | None, settings: LocalTraining = ONE_STEP
) -> dict[str, np.ndarray]:
    images, labels = _data()
    model = _model()
    fit(model, labelled_dataset(images, labels), _ce, settings=settings, device=CPU, seed=3,
        hooks=hooks)
    return _state(model)


def test_zero_control_variates_train_exactly_as_fedavg() -> None:
    settings = LocalTraining(steps=5, batch_size=4, optimizer="adam", lr=1e-2)
    zeros = {k: np.zeros_like(v) for k, v in _state(_model()).items()}
    plain, corrected = _train(None, settings), _train(DriftCorrection(zeros, {}), settings)
    assert plain.keys() == corrected.keys()
    for name in plain:
        np.testing.assert_array_equal(plain[name], corrected[name])


def test_each_step_follows_the_gradient_plus_c_minus_c_i() -> None:
    start = _state(_model())
    rng = np.random.default_rng(1)
    server = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in start.items()}
    site = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in start.items()}
    plain, corrected = _train(None), _train(DriftCorrection(server, site))
    for name in start:  # one SGD step over the whole (shuffled) data: w - lr * (g + c - c_i)
        np.testing.assert_allclose(
            corrected[name], plain[name] - 0.1 * (server[name] - site[name]), atol=1e-6
        )


def test_the_new_control_variate_is_the_mean_gradient_used() -> None:
    images, labels = _data()
    start = _state(_model())
    server = {k: np.full(v.shape, 0.5, np.float32) for k, v in start.items()}
    old = {k: np.full(v.shape, 0.2, np.float32) for k, v in start.items()}
    drift = DriftCorrection(server, old)
    _train(drift)
    new, change = drift.updated()
    expected = _gradient(images, labels)  # one full-batch step: its gradient, uncorrected
    for name, gradient in expected.items():
        np.testing.assert_allclose(new[name], gradient, atol=1e-6)
        np.testing.assert_allclose(change[name], gradient - old[name], atol=1e-6)


def test_under_dp_the_control_variate_is_the_noisy_gradient_and_costs_nothing() -> None:
    images, labels = _data()
    zeros = {k: np.zeros_like(v) for k, v in _state(_model()).items()}

    def run(hooks: DriftCorrection | None) -> PrivacyState:
        privacy = PrivacyState(noise_multiplier=1.0, sample_rate=0.5, planned_steps=4,
                               target_epsilon=1e9, delta=1e-5, accountant="rdp",
                               max_grad_norm=1.0)
        fit_dp(_model(), labelled_dataset(images, labels), _ce,
               settings=LocalTraining(steps=4, batch_size=8, optimizer="sgd", lr=0.1),
               device=CPU, privacy=privacy, hooks=hooks)
        return privacy

    drift = DriftCorrection(zeros, {})
    with_drift, without = run(drift), run(None)
    assert with_drift.history == without.history  # the same steps, accounted the same
    assert with_drift.epsilon() == pytest.approx(without.epsilon())
    new, _ = drift.updated()
    assert drift.steps == 4
    # Opacus's names (`_module.x`) were mapped back to the model's, and every parameter learnt
    assert set(new) == set(zeros)
    assert all(np.abs(new[k]).sum() > 0 for k, _ in _model().named_parameters())


def test_shapes_that_disagree_name_the_variate() -> None:
    with pytest.raises(ValueError, match=r"'w' has shape \(2,\).*start a new run"):
        DriftCorrection({"w": np.zeros(3)}, {"w": np.zeros(2)})


def test_control_state_round_trip_and_damage(tmp_path: Path) -> None:
    path = control_path(tmp_path, "run-1")
    assert load_control(path) == {}
    save_control(path, {"features.0.weight": np.arange(4, dtype=np.float32)})
    np.testing.assert_array_equal(load_control(path)["features.0.weight"], np.arange(4))
    path.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match=str(path)):
        load_control(path)
