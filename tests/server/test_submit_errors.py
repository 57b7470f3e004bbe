"""What `medfed run` says when `flwr` fails: the reason Flower printed, not its box's border."""

import contextlib
import io
from pathlib import Path

import click
from typer import rich_utils

from common.operator_kit import OperatorKit
from server.submit import _error

KIT = OperatorKit(path=Path("kits/operator"), project="p", superlink="127.0.0.1:9093")


def _flower_prints(message: str) -> str:
    """What the `flwr` CLI writes to stderr for a ClickException: typer's rich error box."""
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        rich_utils.rich_format_error(click.ClickException(message))
    return out.getvalue()


def test_a_refused_run_names_flowers_reason_not_the_box_border() -> None:
    reason = (
        "Run config key 'warmup-rounds' is not in the app config: a long message that wraps "
        "across the box at eighty columns"
    )
    printed = _flower_prints(reason)
    assert printed.strip().splitlines()[-1].startswith("╰")  # the border the old code showed
    message = str(_error("Loading project configuration...\n" + printed, KIT))
    assert message == reason


def test_output_without_a_box_gives_its_last_line() -> None:
    said = _error("starting\nflwr: something went wrong\n", KIT)
    assert str(said) == "flwr: something went wrong"
    assert str(_error("", KIT)) == "flwr failed without a message"
