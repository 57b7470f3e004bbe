"""pyproject's `[tool.flwr.app.config]` is RunConfig's settings, key for key and default for
default (issue 22: a setting is one edit, in RunConfig; this test says when pyproject lags)."""

import dataclasses
import tomllib
from pathlib import Path

import click
import typer

from common.app_config import METRICS_KEYS, app_config, render, write
from common.config import RUN, SIMULATE, RunConfig
from medfed.cli import app

ROOT = Path(__file__).resolve().parents[2]
FIX = "run `python -m common.app_config --write` to rewrite the block in pyproject.toml"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def _options(command: str) -> set[str]:
    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    return {p.name or "" for p in group.commands[command].params}


def test_pyproject_has_every_setting_and_nothing_else() -> None:
    declared, written = app_config(), _pyproject()
    missing = sorted(set(declared) - set(written))
    unknown = sorted(set(written) - set(declared))
    assert not missing, f"pyproject.toml's app config lacks {missing}; {FIX}"
    assert not unknown, f"pyproject.toml's app config has keys RunConfig lacks: {unknown}"


def test_pyproject_defaults_are_runconfigs() -> None:
    declared, written = app_config(), _pyproject()
    differ = {
        k: (written[k], v) for k, v in declared.items()
        if k in written and (written[k] != v or type(written[k]) is not type(v))
    }
    assert not differ, f"pyproject.toml (written, declared) differ: {differ}; {FIX}"


def test_the_printed_block_is_the_declared_config() -> None:
    assert tomllib.loads(render())["tool"]["flwr"]["app"]["config"] == app_config()


def test_every_flag_of_medfed_run_is_a_key_the_superlink_accepts() -> None:
    """`medfed run --channels 3` sends channels=3 as an override; Flower's SuperLink refuses an
    override whose key the app config lacks (fuse_dicts(check_keys=True))."""
    keys = set(_pyproject())
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    sent = {name.replace("_", "-") for name in _options("run") if name in fields}
    assert sent, "medfed run has no run setting flags"
    assert sent <= keys, f"medfed run sends keys pyproject lacks: {sorted(sent - keys)}"


def test_flags_are_the_settings_offered_on_each_command() -> None:
    """Each RunConfig field offered `on` a command is one of its flags, and only those."""
    for command in (SIMULATE, RUN):
        offered = {f.name for f in dataclasses.fields(RunConfig) if command in f.metadata["on"]}
        fields = {f.name for f in dataclasses.fields(RunConfig)}
        flags = _options(command) & fields
        # `medfed run` names the aggregator's test folder with its own --test-data
        assert flags - {"test_data"} == offered - {"test_data"}, command
    assert set(METRICS_KEYS) == {"metrics-port", "metrics-host"}


def test_write_rewrites_the_block_and_nothing_else(tmp_path: Path) -> None:
    """A key missing (a setting added to RunConfig alone) comes back; every other byte stays."""
    current = (ROOT / "pyproject.toml").read_text()
    lagging = current.replace('local-steps = 20\n', "", 1)
    assert lagging != current
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(lagging)
    assert write(pyproject) is True
    assert pyproject.read_text() == current
    assert write(pyproject) is False  # already up to date
