"""Small real-DICOM hospitals for the command-line and monitoring tests."""

from pathlib import Path

import pytest

from tests.simulations.conftest import write_easy_hospitals


@pytest.fixture(scope="session")
def small_hospitals(tmp_path_factory) -> Path:
    """Three small sites of unequal size and a test folder: a run of few seconds per round."""
    sites = [("site-a", 50, 0.3), ("site-b", 40, 0.5), ("site-c", 30, 0.6)]
    return write_easy_hospitals(tmp_path_factory.mktemp("small"), sites, 40, seed=1)
