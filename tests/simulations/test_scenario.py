"""Scenario files: every example parses, bad keys and values are named, flags override the file."""

from pathlib import Path

import pytest

from common.config import ConfigError
from simulations.scenario import Federation, Scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "simulations" / "scenarios"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["quick", "non-iid", "hostile", "scale-200", "scale-1000"])
def test_example_scenarios_parse_and_are_documented(name: str):
    scenario = Scenario.load(SCENARIOS / f"{name}.toml")
    cfg = scenario.config()
    assert cfg.sites_dir and cfg.out
    assert name in (SCENARIOS / "README.md").read_text()
    # the run's federation survives the trip through RUN_DIR/scenario.json
    assert Federation.from_dict(scenario.federation.to_dict()) == scenario.federation


def test_scale_1000_samples_a_small_fraction():
    scenario = Scenario.load(SCENARIOS / "scale-1000.toml")
    assert scenario.federation.sites == 1000
    assert scenario.config().fraction_train * 1000 <= 50


def test_hostile_has_20_percent_scaled_or_flipped_and_a_defence():
    scenario = Scenario.load(SCENARIOS / "hostile.toml")
    faults = scenario.federation.faults
    assert faults.misbehave_fraction == pytest.approx(0.2)
    assert set(faults.kinds) == {"scale", "sign_flip"}
    cfg = scenario.config()
    assert cfg.strategy in ("fedmedian", "krum") and cfg.screen_z > 0


def test_every_documented_key_is_accepted(tmp_path: Path):
    text = """
name = "all"
description = "every key"
sites = 12
[data]
path = "pool"
test = "test"
partition = "quantity"
alpha = 0.7
[data.scanner_shift]
intensity = 0.1
contrast = 0.2
noise = 0.01
[faults]
dropout = 0.1
straggler = 0.05
straggler_delay = 3
[misbehave]
sites = {"site-0001" = "nan", "site-0002" = "label_flip"}
kinds = ["scale"]
scale = 5
sign_flip = 2
[resources]
cpus = 0.5
gpus = 0.25
[resources.ray]
address = "auto"
[run]
rounds = 3
round-timeout = 20
fraction_train = 0.5
strategy = "krum"
"""
    s = Scenario.load(_write(tmp_path, text))
    f = s.federation
    assert (f.sites, f.data.partition, f.data.alpha) == (12, "quantity", 0.7)
    assert f.data.scanner_shift.noise == 0.01
    assert (f.faults.dropout, f.faults.straggler, f.faults.straggler_delay) == (0.1, 0.05, 3.0)
    assert dict(f.faults.misbehave_sites) == {"site-0001": "nan", "site-0002": "label_flip"}
    assert (f.resources.cpus, f.resources.gpus, dict(f.resources.ray)) == (
        0.5, 0.25, {"address": "auto"}
    )
    cfg = s.config()
    assert (cfg.sites_dir, cfg.test_data, cfg.rounds, cfg.round_timeout) == ("pool", "test", 3, 20)
    assert cfg.strategy == "krum"


def test_flags_override_the_file(tmp_path: Path):
    s = Scenario.load(_write(tmp_path, '[data]\npath = "a"\n[run]\nrounds = 3\nseed = 4\n'))
    cfg = s.config({"rounds": 7, "sites_dir": "b"})
    assert (cfg.rounds, cfg.seed, cfg.sites_dir) == (7, 4, "b")


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("sitez = 3", "sitez"),
        ("[data]\npartiton = 'iid'", "data.partiton"),
        ("sites = 3\n[data]\npartition = 'random'", "data.partition"),
        ("[data]\npartition = 'iid'", "sites is required"),
        ("sites = 0", "sites must be"),
        ("sites = 5\n[data]\npartition = 'dirichlet'\nalpha = -1", "data.alpha"),
        ("[data]\nalpha = 0.5", "data.alpha needs data.partition"),
        ("[data.scanner_shift]\nnoise = 2", "data.scanner_shift.noise"),
        ("[data.scanner_shift]\nblur = 2", "data.scanner_shift.blur"),
        ("[faults]\ndropout = 1.5", "faults.dropout"),
        ("[faults]\ndropout = 'often'", "faults.dropout must be a number"),
        ("[faults]\nstraggler_delay = -1", "faults.straggler_delay"),
        ("[misbehave]\nfraction = 2", "misbehave.fraction"),
        ("[misbehave]\nkinds = ['poison']", "misbehave.kinds"),
        ("[misbehave]\nfraction = 0.1\nsites = ['site-0001']", "not both"),
        ("[misbehave]\nscale = 0", "misbehave.scale"),
        ("[resources]\ncpus = 0", "resources.cpus"),
        ("[resources]\ngpus = 2", "resources.gpus"),
        ("[resources]\nray = 'auto'", "resources.ray"),
        ("[run]\nrounds = 0", "run.rounds"),
        ("[run]\nroundz = 3", "roundz"),
        ("[run]\nstrategy = 'fedsgd'", "run.strategy"),
        ("[run]\nsites_dir = 'x'", "data.path"),
        ("[run]\ntest-data = 'x'", "data.test"),
        ("run = 3", "[run] must be a table"),
        ("sites = [", "not valid TOML"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, named: str):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        Scenario.load(path)
    assert named in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_points_at_the_examples(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="simulations/scenarios"):
        Scenario.load(tmp_path / "nope.toml")
