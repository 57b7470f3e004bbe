"""Small real-DICOM hospitals for the command-line and monitoring tests."""

from pathlib import Path

import numpy as np
import pytest

from tests.simulations.conftest import write_easy_site


@pytest.fixture(scope="session")
def small_hospitals(tmp_path_factory) -> Path:
    """Three small sites of unequal size and a test folder: a run of few seconds per round."""
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(1)
    for name, n, prevalence in [("site-a", 50, 0.3), ("site-b", 40, 0.5), ("site-c", 30, 0.6)]:
        write_easy_site(root / "sites" / name, n, prevalence, rng)
    write_easy_site(root / "test", 40, 0.5, rng)
    return root
