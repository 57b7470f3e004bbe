import pytest

from common.config import STRATEGIES, ConfigError, RunConfig


def test_defaults_are_private_by_default() -> None:
    cfg = RunConfig()
    assert cfg.dp is True
    assert cfg.target_epsilon == 8.0
    assert cfg.delta == 1e-5


def test_mapping_round_trip_with_kebab_keys() -> None:
    cfg = RunConfig(strategy="fedprox", rounds=7, dp=False, lr=0.1)
    mapping = cfg.to_mapping()
    assert mapping["local-epochs"] == 0 and mapping["local-steps"] == 20
    assert RunConfig.from_mapping(mapping) == cfg


def test_strings_from_run_config_are_coerced() -> None:
    cfg = RunConfig.from_mapping({"rounds": "3", "dp": "false", "target-epsilon": "2.5"})
    assert (cfg.rounds, cfg.dp, cfg.target_epsilon) == (3, False, 2.5)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"target-epsilon": -1}, "--target-epsilon must be > 0, got -1"),
        ({"delta": 1.5}, "--delta must be in (0, 1)"),
        ({"strategy": "fedfoo"}, "--strategy must be one of"),
        ({"rounds": 0}, "--rounds must be >= 1"),
        ({"rounds": "many"}, "--rounds must be a int"),
        ({"rounds": 2.5}, "--rounds must be a int"),
        ({"dp": "maybe"}, "--dp must be a bool"),
        ({"fraction-train": 0}, "--fraction-train must be in (0, 1]"),
        ({"device": "tpu"}, "--device must be auto, cpu"),
        ({"no-such-key": 1}, "unknown setting 'no-such-key'"),
    ],
)
def test_invalid_values_name_the_flag(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping(values)
    assert message in str(info.value)


def test_every_strategy_name_is_valid() -> None:
    for name in STRATEGIES:
        assert RunConfig(strategy=name).strategy == name


def test_unknown_keys_tolerated_when_not_strict() -> None:
    cfg = RunConfig.from_mapping({"server-round": 3, "rounds": 2}, strict=False)
    assert cfg.rounds == 2
