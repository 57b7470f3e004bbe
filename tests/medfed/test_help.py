"""`--help` shows a default for every option (issue 20: --rounds, --lr, ... showed none)."""

import dataclasses
import re

import click
import pytest
import typer
from typer.testing import CliRunner

from common.config import RunConfig
from medfed.cli import app

runner = CliRunner()
RUN_SETTINGS = {f.name for f in dataclasses.fields(RunConfig)} - {"out", "sites_dir", "test_data"}
COMMAND = typer.main.get_command(app)


def _commands(group: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path] if path else []
    if isinstance(group, click.Group):
        for name, sub in group.commands.items():
            found += _commands(sub, (*path, name))
    return found


def _command(path: tuple[str, ...]) -> click.Command:
    command = COMMAND
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


def _help(path: tuple[str, ...]) -> str:
    result = runner.invoke(app, [*path, "--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("path", _commands(COMMAND), ids=" ".join)
def test_every_option_shows_a_default(path: tuple[str, ...]) -> None:
    text = _help(path)
    rows = {}
    for line in text.splitlines():
        match = re.search(r"│\s+(--[a-z0-9-]+)", line)
        if match:
            rows[match.group(1)] = line
        elif rows and "[default:" in line:  # a wrapped row's continuation
            last = list(rows)[-1]
            rows[last] += line
    missing = []
    for param in _command(path).params:
        if not isinstance(param, click.Option) or param.required or param.name == "help":
            continue
        # a value is used when the option is not given: a run setting, a default, or one the
        # help text talks of
        has_default = (
            (param.name or "") in RUN_SETTINGS
            or (
                param.default not in (None, "") and not (param.is_flag and not param.secondary_opts)
            )
            or "default" in (param.help or "").lower()
        )
        flag = max(param.opts, key=len)
        if has_default and "[default:" not in rows.get(flag, ""):
            missing.append(flag)
    assert not missing, f"medfed {' '.join(path)} --help shows no default for {missing}"


def test_training_defaults_are_the_run_configs() -> None:
    text = _help(("simulate",))
    defaults = RunConfig()
    for flag, value in [
        ("--rounds", defaults.rounds),
        ("--lr", f"{defaults.lr:g}"),
        ("--batch-size", defaults.batch_size),
        ("--target-epsilon", f"{defaults.target_epsilon:g}"),
    ]:
        row = next(line for line in text.splitlines() if re.search(rf"│\s+{flag}\s", line))
        # the batch's default goes on to say segmentation's (planned by image size)
        assert re.search(rf"\[default: {value}[];]", row), row
