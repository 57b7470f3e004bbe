"""Helpers of the monitoring tests: ports, HTTP, Prometheus text, tools the tests drive."""

import os
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.ports import free_loopback_port as free_port  # noqa: F401 - the tests import it here


def fetch(url: str, timeout: float = 5) -> str:
    """GET `url`, the body as text."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(sample name, labels): value}."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def require_tool(path: str, how: str) -> None:
    """Skip locally, fail in CI, when a tool the test drives is missing: never a silent pass."""
    if Path(path).is_file() and os.access(path, os.X_OK):
        return
    missing(f"{path} not found; {how}")


def missing(message: str) -> None:
    """Fail in CI (CI=true), skip elsewhere, with what to install."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI must run this test)")
    pytest.skip(message)
