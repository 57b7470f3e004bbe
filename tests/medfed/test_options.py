"""The run settings' flags come from RunConfig's fields (medfed.options, issue 22)."""

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer
from typer.testing import CliRunner

from common.config import RUN, SIMULATE, RunConfig
from common.registry import Strategy, Task
from medfed import options as opt

runner = CliRunner()


def _command(command: str) -> tuple[typer.Typer, list[Mapping[str, Any]]]:
    seen: list[Mapping[str, Any]] = []
    app = typer.Typer()

    @app.command()
    @opt.with_settings(command)
    def run(name: str = "x", settings: Mapping[str, Any] = opt.FROM_FLAGS) -> None:
        seen.append(settings)

    return app, seen


def test_only_the_flags_given_reach_the_command_as_runconfig_keys(tmp_path: Path) -> None:
    app, seen = _command(SIMULATE)
    result = runner.invoke(app, ["--task", "segment", "--no-dp", "--rounds", "3",
                                 "--strategy", "fedprox"])
    assert result.exit_code == 0, result.output
    assert seen == [{"task": "segment", "dp": False, "rounds": 3, "strategy": "fedprox"}]
    cfg = RunConfig.from_mapping(seen[0])
    assert (cfg.task, cfg.dp, cfg.rounds, cfg.strategy) == ("segment", False, 3, "fedprox")


def test_a_local_file_is_made_absolute_only_where_the_run_trains_here(
    tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    for command, expected in ((SIMULATE, str(tmp_path / "enc")), (RUN, "enc")):
        app, seen = _command(command)
        result = runner.invoke(app, ["--init-encoder", "enc"])
        assert result.exit_code == 0, result.output
        assert seen[-1] == {"init_encoder": expected}, command
    assert opt.given_settings({"ledger_dir": Path("led")}, local=True) == {"ledger_dir": "led"}


def test_choices_and_checks_are_the_registrys_and_the_configs() -> None:
    app, _ = _command(SIMULATE)
    bad_task = runner.invoke(app, ["--task", "nope"])
    assert bad_task.exit_code == 2 and "classify" in bad_task.output
    bad_budget = runner.invoke(app, ["--budget-epsilon", "-1"], terminal_width=400,
                               env={"COLUMNS": "400"})
    assert bad_budget.exit_code == 2 and "finite epsilon" in bad_budget.output
    assert opt.given_settings({"task": Task.segment, "strategy": Strategy.krum}, local=False) == {
        "task": "segment", "strategy": "krum"}


def test_each_setting_offered_on_a_command_is_a_flag_with_its_help() -> None:
    for command in (SIMULATE, RUN):
        app, _ = _command(command)
        text = runner.invoke(app, ["--help"], terminal_width=400, env={"COLUMNS": "400"}).output
        for f in dataclasses.fields(RunConfig):
            flag = "--" + f.name.replace("_", "-")
            if command in f.metadata["on"]:
                assert flag in text, (command, flag)
                assert f.metadata["help"].split(" ")[0] in text
            else:
                assert f"{flag} " not in text, (command, flag)
