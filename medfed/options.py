"""The run settings' flags of `medfed simulate` and `medfed run`, built from RunConfig's fields.

A setting is declared once, in common.config.RunConfig (`setting(default, help, on=...)`); a
command decorated with `with_settings(command)` gets a `--kebab-case` option for every field
offered `on` it, with that help text and default, and receives the ones the user gave as one
`settings` mapping. Each option is None when not given, so that the run's defaults (RunConfig,
the Flower App's run config, or a scenario's) apply and a resumed run keeps its own values.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from common.config import (
    RUN,
    SIMULATE,
    ConfigError,
    RunConfig,
    app_default,
    check_budget,
    flag,
)
from common.registry import Task

F = TypeVar("F", bound=Callable[..., Any])
_RUN = RunConfig()
_FIELDS: Mapping[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(RunConfig)}
_TYPES: Mapping[str, type] = {"int": int, "float": float, "bool": bool, "str": str}
# the default of a command's `settings` parameter: where its settings' flags go in --help
FROM_FLAGS: Mapping[str, Any] = {}


def _default(name: str, command: str) -> str:
    """The run's default for a setting as --help shows it (declared once, in RunConfig).

    `medfed run` starts from the Flower App's run config, whose defaults are the demo's.
    """
    value = app_default(_FIELDS[name]) if command == RUN else getattr(_RUN, name)
    if isinstance(value, bool):
        return flag(name) if value else "--no-" + flag(name)[2:]
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else "none"


def _option(*decls: str, help: str, shown: str, **extra: Any) -> Any:
    """typer.Option whose help ends with what applies when the flag is not given.

    Escaped, because rich reads a bare "[default: 5]" as markup and drops it from --help, and
    typer's show_default="5" prints "(5)".
    """
    return typer.Option(*decls, help=f"{help} \\[default: {shown}]", **extra)


def checked(check: Callable[[Any, str], Any], where: str) -> Callable[[Any], Any]:
    """A typer callback: `check(value, where)` when given; its ConfigError is a usage error."""

    def callback(value: Any) -> Any:
        try:
            return None if value is None else check(value, where)
        except ConfigError as exc:
            raise typer.BadParameter(str(exc)) from None

    return callback


def budget_flag(value: float | None) -> float | None:
    """--budget-epsilon: a finite epsilon > 0 when given (usage error, exit 2, otherwise)."""
    return checked(check_budget, "--budget-epsilon")(value)


def setting_option(name: str, command: str = SIMULATE) -> Any:
    """The typer.Option of RunConfig field `name` on `command`: its help, default and check."""
    meta = _FIELDS[name].metadata
    decls = (f"{flag(name)}/--no-{flag(name)[2:]}",) if _FIELDS[name].type == "bool" else ()
    extra = {"callback": checked(meta["check"], flag(name))} if meta["check"] else {}
    shown = meta["shown"] or _default(name, command)
    return _option(*decls, help=meta["help"], shown=shown, **extra)


def setting_type(name: str, command: str) -> Any:
    """The option's type (the field's, a registry's names, a Path for a file) and Option."""
    meta = _FIELDS[name].metadata
    kind = meta["choices"] or (Path if meta["path"] else _TYPES[str(_FIELDS[name].type)])
    return Annotated[kind | None, setting_option(name, command)]


TaskOpt = Annotated[Task | None, setting_option("task")]
LedgerDir = Annotated[Path | None, setting_option("ledger_dir")]


def given_settings(values: Mapping[str, Any], *, local: bool) -> dict[str, Any]:
    """The settings the user gave (None: not given), as RunConfig.from_mapping takes them.

    Args:
        local: the run trains on this machine, so a file a flag names (`path="local"`) is made
            absolute: the sites may run in another working folder.

    """
    settings: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, Path):
            value = str(value.resolve() if local and _FIELDS[name].metadata["path"] == "local"
                        else value)
        settings[name] = value
    return settings


def with_settings(command: str) -> Callable[[F], F]:
    """Give a typer command the flags of every RunConfig setting offered `on` `command`.

    The command declares `settings: Mapping[str, Any] = FROM_FLAGS` where the flags go in its
    --help, and is called with the settings the user gave (given_settings).
    """
    names = [f.name for f in dataclasses.fields(RunConfig) if command in f.metadata["on"]]

    def wrap(fn: F) -> F:
        hints = typing.get_type_hints(fn, include_extras=True)
        params: list[inspect.Parameter] = []
        for param in inspect.signature(fn).parameters.values():
            if param.name == "settings":
                params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None,
                                             annotation=setting_type(n, command)) for n in names]
            else:
                params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY,
                                            annotation=hints[param.name]))

        @functools.wraps(fn)
        def with_flags(**kwargs: Any) -> Any:
            values = {n: kwargs.pop(n) for n in names}
            return fn(**kwargs, settings=given_settings(values, local=command == SIMULATE))

        # typer reads the signature and the annotations: the settings' options in place of
        # `settings`, every parameter keyword-only (typer passes them by name)
        with_flags.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        with_flags.__annotations__ = {p.name: p.annotation for p in params}
        return typing.cast(F, with_flags)

    return wrap
