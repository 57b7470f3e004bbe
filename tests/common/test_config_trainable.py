"""Settings that cannot train are refused when parsed, naming the flag (and what would work)."""

import math
from dataclasses import fields

import pytest

from common.config import ConfigError, RunConfig
from common.privacy import calibrate_noise, smallest_epsilon

FLOAT_FLAGS = [f.name for f in fields(RunConfig) if f.type == "float"]


@pytest.mark.parametrize("name", FLOAT_FLAGS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_flag_must_be_finite(name: str, value: float) -> None:
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError, match=f"^{flag} must be a finite number"):
        RunConfig.from_mapping({name: value})


def test_the_float_flags_include_the_ones_that_trained_nothing() -> None:
    assert {"lr", "max_grad_norm", "clip_norm", "target_epsilon"} <= set(FLOAT_FLAGS)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_an_epsilon_no_noise_reaches_is_refused_with_the_smallest_that_works(
    accountant: str,
) -> None:
    floor = smallest_epsilon(delta=1e-5, accountant=accountant)
    assert 0 < floor < 0.2
    with pytest.raises(ConfigError, match="--target-epsilon 1e-06 is too small") as err:
        RunConfig(target_epsilon=1e-6, accountant=accountant)
    shown = float(str(err.value).split("is ")[-1].split(";")[0])
    assert shown >= floor
    # the epsilon it names works: Opacus calibrates noise for a real site's steps...
    RunConfig(target_epsilon=shown, accountant=accountant)
    sigma = calibrate_noise(target_epsilon=shown, delta=1e-5, sample_rate=1 / 4, steps=20,
                            accountant=accountant)
    assert math.isfinite(sigma)
    # ...and just below the floor Opacus gives up, as the check said it would
    with pytest.raises(ValueError, match="too low"):
        calibrate_noise(target_epsilon=floor * 0.99, delta=1e-5, sample_rate=1 / 4, steps=20,
                        accountant=accountant)


def test_the_epsilon_bound_only_applies_with_dp() -> None:
    RunConfig(target_epsilon=1e-6, dp=False)
