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
    """The task identity Flower Messages need outside a run (run_simulation sets the same)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
