"""Building Flower Messages outside a running task (tests, and code run beside Flower).

Flower 1.41.0 and 1.42.0 stamp every new `Message` with the identity of the task running in the
process: `flwr/supercore/task_identity.py`'s `TaskIdentity` class holds `task_id`, `run_id` and
`node_id` as class attributes, whose getters raise "TaskIdentity.task_id is not set." until a
task sets them (`run_simulation` and the ClientApp/ServerApp processes do). Code that builds
Messages outside a task, as most of medfed's tests do, sets an identity for the length of a block.

Gate: `identity()` writes Flower's private attributes (`_task_id`, ...), so it refuses a Flower
release it was not checked against.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from common.flower_compat import Gate

GATE = Gate(
    patch="building Flower Messages outside a task (tests' `task_identity` fixture)",
    flower_code="flwr/supercore/task_identity.py (TaskIdentity)",
    test="tests/common/flower_compat/test_task_identity.py",
)


@contextmanager
def identity(*, task_id: int = 1, run_id: int = 1, node_id: int = 0) -> Iterator[None]:
    """Within the block, Messages are built as if by task `task_id` of run `run_id`."""
    GATE.require()
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
