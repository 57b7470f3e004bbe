import os

import pytest


# Decoded-image cache and privacy ledgers per test session, never the user's ~/.cache or
# ~/.medfed (child processes and Ray workers inherit the environment).
@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["MEDFED_CACHE_DIR"] = str(tmp_path_factory.mktemp("medfed-cache"))
    os.environ["MEDFED_LEDGER_DIR"] = str(tmp_path_factory.mktemp("medfed-ledger"))
    yield


@pytest.fixture
def task_identity():
    """The task identity Flower Messages need outside a run (common.flower_compat.task_identity)."""
    from common.flower_compat.task_identity import identity

    with identity():
        yield
