"""A deployed message's content as one Array on the wire, and back, unchanged.

Flower moves a message as a tree of objects: the message, its content, each record, and every
Array with its chunks, each one request to the SuperLink and a few database statements there
(measured with py-spy: most of the SuperLink's time in a deployed round is SQLAlchemy, per
object). A 26-tensor CNN's training message is 56 objects, and three sites pulling and pushing
them cost 2 to 3 s of every message on 2 cores (bench/deploy.py). Packed, the whole content
(arrays, config, metrics) is one Array in one record: 5 objects.

`pack` and `unpack` change only the transport form. The content is Flower's own protobuf
encoding of the RecordDict (common.flower_compat.wire), so the strategies, the outbound guard and
the audit trail see exactly the records the other side made. Packing happens where messages
leave and enter a deployed process: the aggregator's grid (server.grids.PromptGrid) and the
site's ClientApp shim (client.shim). A simulation moves messages in memory and never packs.
Unpacking parses protobuf: nothing is unpickled.
"""

from __future__ import annotations

import copy

from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.app.message import make_message  # Flower's own copy-with-metadata (flwr serde)
from google.protobuf.message import DecodeError

from common.flower_compat import wire

PACKED = "medfed-packed"  # the one record, and the one Array in it, of a packed content
STYPE = "medfed.packed-content.v1"


class PackingError(ValueError):
    """A packed content that does not unpack: damaged, or not made by `pack`."""


def is_packed(content: RecordDict) -> bool:
    """Whether `content` is the one Array `pack` makes."""
    record = content.get(PACKED)
    return (list(content.keys()) == [PACKED] and isinstance(record, ArrayRecord)
            and list(record.keys()) == [PACKED] and record[PACKED].stype == STYPE)


def pack(message: Message) -> Message:
    """A copy of `message` whose content is one Array (an error, or no content, passes as is)."""
    if message.has_error() or not message.has_content() or not len(message.content):
        return message
    data = wire.records_bytes(message.content)
    blob = Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)
    content = RecordDict({PACKED: ArrayRecord({PACKED: blob})})
    return make_message(copy.deepcopy(message.metadata), content=content)


def unpack(message: Message) -> Message:
    """A copy of `message` with the content `pack` packed (any other message is returned)."""
    if message.has_error() or not message.has_content() or not is_packed(message.content):
        return message
    record = message.content[PACKED]
    assert isinstance(record, ArrayRecord)
    try:
        content = wire.records_from(record[PACKED].data)
    except DecodeError as exc:
        raise PackingError(f"a packed message content does not unpack ({exc})") from None
    return make_message(copy.deepcopy(message.metadata), content=content)
