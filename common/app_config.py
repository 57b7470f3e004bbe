"""The Flower App's run config (pyproject's `[tool.flwr.app.config]`), derived from RunConfig.

`flwr run .` and `medfed run` start from these keys, and the SuperLink refuses an override whose
key is not among them, so every RunConfig setting must be one. tests/common/test_config_app.py
checks pyproject against `app_config()`; `python -m common.app_config` prints the block to paste
there after a setting is added or its default changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tomli_w

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


if __name__ == "__main__":
    print(render())
