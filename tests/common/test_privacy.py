import math

import pytest
from opacus.accountants import RDPAccountant

from common.privacy import (
    PrivacyBudgetSpent,
    PrivacyState,
    batches_per_epoch,
    calibrate_noise,
    epsilon_of,
)


def test_calibrated_noise_spends_the_target_epsilon() -> None:
    sigma = calibrate_noise(
        target_epsilon=8.0, delta=1e-5, sample_rate=0.1, steps=200, accountant="rdp"
    )
    eps = epsilon_of([(sigma, 0.1, 200)], delta=1e-5, accountant="rdp")
    assert 7.8 <= eps <= 8.0


def test_plan_uses_opacus_sample_rate_definition() -> None:
    state = PrivacyState.plan(
        num_examples=200, batch_size=32, rounds=4, steps_per_round=14, target_epsilon=8,
        delta=1e-5, accountant="rdp", max_grad_norm=1.0,
    )
    assert batches_per_epoch(200, 32) == 7
    assert state.sample_rate == pytest.approx(1 / 7)
    assert state.planned_steps == 4 * 2 * 7


def test_epsilon_across_rounds_equals_one_accountant_over_all_steps() -> None:
    state = PrivacyState.plan(
        num_examples=100, batch_size=10, rounds=5, steps_per_round=10, target_epsilon=4,
        delta=1e-5, accountant="rdp", max_grad_norm=1.0,
    )
    history: list[tuple[float, float, int]] = []
    per_round = []
    for _ in range(5):
        # what Opacus's accountant does each round: add steps at (sigma, q)
        acc = RDPAccountant()
        acc.history = list(history)
        for _ in range(10):
            acc.step(noise_multiplier=state.noise_multiplier, sample_rate=state.sample_rate)
        history = acc.history
        state.record(history)
        per_round.append(state.epsilon())
    one = RDPAccountant()
    one.history = [(state.noise_multiplier, state.sample_rate, 50)]
    assert state.steps == 50
    assert per_round[-1] == pytest.approx(one.get_epsilon(1e-5), rel=1e-9)
    assert per_round == sorted(per_round)  # cumulative: never goes down
    assert per_round[-1] <= 4.0


def test_state_survives_save_and_load(tmp_path) -> None:
    state = PrivacyState.plan(
        num_examples=50, batch_size=10, rounds=2, steps_per_round=5, target_epsilon=8,
        delta=1e-5, accountant="rdp", max_grad_norm=1.0,
    )
    state.record([(state.noise_multiplier, state.sample_rate, 5)])
    state.save(tmp_path / "p.json")
    loaded = PrivacyState.load(tmp_path / "p.json")
    assert loaded == state
    assert math.isclose(loaded.epsilon(), state.epsilon())


def test_history_never_shrinks() -> None:
    state = PrivacyState.plan(
        num_examples=50, batch_size=10, rounds=2, steps_per_round=5, target_epsilon=8,
        delta=1e-5, accountant="rdp", max_grad_norm=1.0,
    )
    state.record([(1.0, 0.2, 5)])
    with pytest.raises(ValueError, match="shrank"):
        state.record([(1.0, 0.2, 2)])


def test_no_steps_no_epsilon() -> None:
    assert epsilon_of([], delta=1e-5, accountant="rdp") == 0.0


def test_extending_a_run_recalibrates_within_the_target() -> None:
    state = PrivacyState.plan(
        num_examples=100, batch_size=10, rounds=4, steps_per_round=10, target_epsilon=8,
        delta=1e-5, accountant="rdp", max_grad_norm=1.0,
    )
    state.record([(state.noise_multiplier, state.sample_rate, 20)])  # 2 of 4 rounds done
    planned_sigma = state.noise_multiplier
    state.ensure_room(20)  # the rest of the plan: nothing changes
    assert state.noise_multiplier == planned_sigma
    state.ensure_room(40)  # the run was extended by two rounds: more noise, same target
    assert state.noise_multiplier > planned_sigma
    after = epsilon_of(
        [*state.history, (state.noise_multiplier, state.sample_rate, 40)],
        delta=1e-5, accountant="rdp",
    )
    assert 7.9 < after <= 8.0


def test_a_spent_budget_refuses_further_training() -> None:
    state = PrivacyState.plan(
        num_examples=100, batch_size=10, rounds=2, steps_per_round=10, target_epsilon=1,
        delta=1e-5, accountant="rdp", max_grad_norm=1.0,
    )
    state.record([(0.5, state.sample_rate, 200)])  # far past the target already
    with pytest.raises(PrivacyBudgetSpent, match="spent"):
        state.ensure_room(10)
