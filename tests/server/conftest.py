import pytest


@pytest.fixture(autouse=True)
def _task_identity(task_identity):
    # every server test builds Flower Messages
    yield
