"""The Flower App's run config (pyproject's `[tool.flwr.app.config]`), derived from RunConfig.

`flwr run .` and `medfed run` start from these keys, and the SuperLink refuses an override whose
key is not among them, so every RunConfig setting must be one. tests/common/test_config_app.py
checks pyproject against `app_config()`. After a setting is added or its default changes,
`python -m common.app_config --write` rewrites the block in pyproject.toml (the rest of the file
is left as it is); without `--write` it prints the block.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import tomli_w

from common.atomic import write_text
from common.config import RunConfig, app_default
from common.metrics_endpoint import DEFAULT_HOST

# the ServerApp's dashboard and /metrics, split off before RunConfig parses the rest
# (common.metrics_endpoint.MetricsSettings.split_run_config); port 0 is off
METRICS_KEYS: dict[str, Any] = {"metrics-port": 0, "metrics-host": DEFAULT_HOST}


def key(name: str) -> str:
    """A field's run-config key: its name in kebab-case."""
    return name.replace("_", "-")


def app_config() -> dict[str, Any]:
    """Every key of the Flower App's run config with its default, in RunConfig's order."""
    values = {key(f.name): app_default(f) for f in dataclasses.fields(RunConfig)}
    return {**values, **METRICS_KEYS}


def render() -> str:
    """The `[tool.flwr.app.config]` block; a comment says what a default that is not plain means."""
    notes = {key(f.name): f.metadata.get("shown") for f in dataclasses.fields(RunConfig)}
    lines = ["[tool.flwr.app.config]"]
    for name, value in app_config().items():
        line = tomli_w.dumps({name: value}).strip()
        lines.append(f"{line}  # {notes[name]}" if notes.get(name) else line)
    return "\n".join(lines)


HEADER = "[tool.flwr.app.config]"


def write(pyproject: Path) -> bool:
    """Replace `pyproject`'s app-config block with the declared one; True when it changed."""
    text = pyproject.read_text()
    start = text.find("\n" + HEADER + "\n")
    if start < 0:
        raise ValueError(f"{pyproject} has no {HEADER} table to rewrite")
    start += 1
    blank = text.find("\n\n", start)  # the block is one run of lines, as render() writes it
    end = len(text) if blank < 0 else blank + 1
    new = text[:start] + render() + "\n" + text[end:]
    if new == text:
        return False
    write_text(pyproject, new)
    return True


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        target = Path(__file__).resolve().parents[1] / "pyproject.toml"
        print(f"{target}: {'rewritten' if write(target) else 'already up to date'}")
    else:
        print(render())
