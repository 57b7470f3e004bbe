"""Flower Messages built outside a task need an identity; `identity()` lends one for a block."""

import flwr
import pytest
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.flower_compat import FlowerVersionError
from common.flower_compat.task_identity import identity


def _message() -> Message:
    return Message(RecordDict(), dst_node_id=3, message_type="train")


def test_a_message_needs_an_identity_and_the_block_lends_one() -> None:
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    if saved[0] is None:  # outside the block (and any other test's fixture) Flower refuses
        with pytest.raises(RuntimeError, match="TaskIdentity"):
            _message()
    with identity(run_id=7, node_id=2):
        msg = _message()
        assert msg.metadata.run_id == 7 and msg.metadata.src_node_id == 2
    assert (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id) == saved


def test_an_unchecked_flower_release_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    with pytest.raises(FlowerVersionError, match="task_identity.py"):
        with identity():
            pass
