"""A Flower `Message`, `Context` or message content as bytes, in Flower's own protobuf form.

Used for the hand-over to a site's warm worker, and for a deployed message's content packed
in one Array (common.packing).

The deployed ClientApp (client.shim) runs in the process Flower starts for each message and
hands the message to the site's long-lived worker (client.worker) over a local socket. Flower's
own protobuf forms carry them, so every record, its metadata and any error arrive as Flower made
them: `flwr/common/serde.py` (`message_to_proto`, `message_from_proto`, `context_to_proto`,
`context_from_proto`, `recorddict_to_proto`, `recorddict_from_proto`) and
`flwr/proto/message_pb2.py`, unchanged in 1.41.0 and 1.42.0. Nothing
here changes Flower; the gate says where to look when these functions move.
"""

from __future__ import annotations

from typing import TypeVar

from flwr.app import Context, Message, RecordDict
from flwr.common import serde
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from common.flower_compat import Gate

_Proto = TypeVar("_Proto", ProtoMessage, ProtoContext, ProtoRecordDict)

GATE = Gate(
    patch="the site worker's message hand-over",
    flower_code="flwr/common/serde.py (message_to_proto, context_to_proto and their inverses)",
    test="tests/client/test_worker.py",
)


def message_bytes(message: Message) -> bytes:
    """`message` (metadata, content or error) as Flower's protobuf bytes."""
    return bytes(serde.message_to_proto(message).SerializeToString())


def message_from(data: bytes) -> Message:
    """The Message `message_bytes` wrote."""
    return serde.message_from_proto(_parsed(ProtoMessage(), data))


def context_bytes(context: Context) -> bytes:
    """`context` (run and node ids, node and run config, state) as protobuf bytes."""
    return bytes(serde.context_to_proto(context).SerializeToString())


def context_from(data: bytes) -> Context:
    """The Context `context_bytes` wrote."""
    return serde.context_from_proto(_parsed(ProtoContext(), data))


def records_bytes(content: RecordDict) -> bytes:
    """A message's content (every record) as Flower's protobuf bytes."""
    return bytes(serde.recorddict_to_proto(content).SerializeToString())


def records_from(data: bytes) -> RecordDict:
    """The RecordDict `records_bytes` wrote."""
    return serde.recorddict_from_proto(_parsed(ProtoRecordDict(), data))


def _parsed(proto: _Proto, data: bytes) -> _Proto:
    proto.ParseFromString(data)
    return proto
