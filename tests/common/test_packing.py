"""The wire form of a deployed message's content: one Array each way, unpacked byte for byte."""

from collections.abc import Iterator

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from common.flower_compat.task_identity import identity
from common.packing import PACKED, STYPE, PackingError, is_packed, pack, unpack
from server.grids import PromptGrid


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with identity(task_id=1, run_id=1, node_id=1):
        yield


def _message() -> Message:
    state = {"conv.weight": torch.randn(4, 1, 3, 3), "norm.bias": torch.zeros(4),
             "steps": torch.tensor(7), "empty": torch.zeros(0, 3, dtype=torch.float16)}
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"lr": 0.1}),
                          "metrics": MetricRecord({"loss": 0.5})})
    return Message(content, dst_node_id=3, message_type="train", group_id="2")


def test_a_packed_message_is_one_array_and_unpacks_to_the_same_objects() -> None:
    msg = _message()
    packed = pack(msg)
    assert list(packed.content) == [PACKED] and is_packed(packed.content)
    assert list(packed.content.array_records[PACKED]) == [PACKED]
    assert packed.metadata.dst_node_id == 3 and packed.metadata.group_id == "2"
    back = unpack(packed)
    # every Array, record and the content itself: the same object ids (the same bytes)
    assert back.content.object_id == msg.content.object_id
    for name, array in msg.content.array_records["arrays"].items():
        got = back.content.array_records["arrays"][name]
        assert (got.dtype, got.shape, got.stype, got.data) == (
            array.dtype, array.shape, array.stype, array.data)
    assert back.content.config_records["config"]["lr"] == 0.1
    # the original is left as it was (a strategy keeps it to count what it sent)
    assert "conv.weight" in msg.content.array_records["arrays"]


def test_contents_not_packed_and_errors_pass_unchanged() -> None:
    plain = _message()
    assert unpack(plain) is plain
    failed = Message(Error(code=1, reason="no"), reply_to=_message())
    assert pack(failed) is failed and unpack(failed) is failed


@pytest.mark.parametrize("cut", [3, 40, -5])
def test_a_damaged_packed_content_is_refused(cut: int) -> None:
    data = pack(_message()).content.array_records[PACKED][PACKED].data
    damaged = Message(RecordDict({PACKED: ArrayRecord({PACKED: Array(
        dtype="uint8", shape=(len(data[:cut]),), stype=STYPE, data=data[:cut])})}),
        dst_node_id=3, message_type="train")
    with pytest.raises(PackingError):
        unpack(damaged)


class _Grid:
    """The part of Flower's grid PromptGrid uses: pushes kept, replies made at once."""

    def __init__(self) -> None:
        self.pushed: list[Message] = []

    def push_messages(self, messages):
        self.pushed.extend(messages)
        return [str(i) for i, _ in enumerate(self.pushed)]

    def pull_messages(self, message_ids):
        replies = []
        for i in message_ids:
            sent = self.pushed[int(i)]
            reply = Message(RecordDict({PACKED: sent.content.array_records[PACKED]}),
                            reply_to=sent)
            reply.metadata.__dict__["_reply_to_message_id"] = i
            replies.append(reply)
        return replies


def test_the_aggregators_grid_packs_what_it_sends_and_unpacks_what_it_receives() -> None:
    inner = _Grid()
    grid = PromptGrid(inner)  # type: ignore[arg-type]
    msg = _message()
    replies = list(grid.send_and_receive([msg], timeout=5))
    assert is_packed(inner.pushed[0].content)
    (reply,) = replies
    assert reply.content.array_records["arrays"].object_id == (
        msg.content.array_records["arrays"].object_id)
