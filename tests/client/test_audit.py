import hashlib
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.audit import GENESIS, AuditError, AuditLog, describe_reply, payload_sha256, verify
from tests.client.replies import _model, _privacy, train_reply

# --- the hash chain ----------------------------------------------------------------------------


def _chain(path: Path, n: int = 5) -> list[dict]:
    log = AuditLog(path)
    return [log.append({"run": "r1", "round": i + 1, "message_type": "train"}) for i in range(n)]


def test_chain_of_five_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    written = _chain(path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == written
    assert [r["seq"] for r in lines] == [0, 1, 2, 3, 4]
    assert lines[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(lines, lines[1:], strict=False))
    result = verify(path)
    assert (result.ok, result.entries, result.error) == (True, 5, None)
    assert result.head == lines[-1]["hash"]


def test_missing_and_empty_files_are_empty_valid_chains(tmp_path: Path) -> None:
    assert verify(tmp_path / "none.jsonl").ok
    (tmp_path / "empty.jsonl").write_text("")
    result = verify(tmp_path / "empty.jsonl")
    assert (result.ok, result.entries) == (True, 0)


def _edit_line_3(lines: list[str]) -> list[str]:
    record = json.loads(lines[2])
    record["round"] = 99
    return [*lines[:2], json.dumps(record, sort_keys=True, separators=(",", ":")), *lines[3:]]


def _rehash_line_3(lines: list[str]) -> list[str]:
    # An editor who also recomputes the line's own hash is caught by the next line's prev.
    record = json.loads(lines[2])
    record["round"] = 99
    del record["hash"]
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"))
    record["hash"] = hashlib.sha256(canonical.encode()).hexdigest()
    return [*lines[:2], json.dumps(record), *lines[3:]]


def _append_wrong_prev(lines: list[str]) -> list[str]:
    record = {"seq": 5, "time": "2025-01-01T00:00:00+00:00", "run": "r1", "prev": "f" * 64}
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"))
    record["hash"] = hashlib.sha256(canonical.encode()).hexdigest()
    return [*lines, json.dumps(record)]


@pytest.mark.parametrize(
    ("tamper", "line", "why"),
    [
        (_edit_line_3, 3, "hash mismatch"),
        (_rehash_line_3, 4, "prev mismatch"),
        (lambda lines: [lines[0], *lines[2:]], 2, "seq gap"),  # line 2 deleted
        (lambda lines: [lines[0], lines[2], lines[1], *lines[3:]], 2, "seq gap"),  # reordered
        (_append_wrong_prev, 6, "prev mismatch"),
        (lambda lines: [*lines[:3], '{"seq": 3, "pr', *lines[4:]], 4, "bad JSON"),
    ],
    ids=["edit-value", "edit-and-rehash", "delete", "reorder", "wrong-prev", "bad-json"],
)
def test_tampering_is_found_at_the_right_line(tmp_path: Path, tamper, line: int, why: str) -> None:
    path = tmp_path / "audit.jsonl"
    _chain(path)
    path.write_text("\n".join(tamper(path.read_text().splitlines())) + "\n")
    result = verify(path)
    assert not result.ok
    assert result.entries == line - 1
    assert result.error is not None
    assert result.error.startswith(f"line {line}: {why}")


def test_append_refuses_reserved_fields_and_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    with pytest.raises(ValueError, match="may not set seq, hash"):
        log.append({"seq": 7, "hash": "x"})
    _chain(path, 2)
    with path.open("a") as f:
        f.write('{"seq": 2, "ti')  # a crash in the middle of a write
    with pytest.raises(AuditError, match="incomplete"):
        log.append({"run": "r1"})


def _append_many(path: str, worker: int, n: int, start) -> None:
    log = AuditLog(Path(path))
    start.wait()  # both processes append at the same time, not one after the other's import
    for i in range(n):
        log.append({"worker": worker, "i": i})


def test_two_processes_append_one_valid_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 50, start)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    result = verify(path)
    assert (result.ok, result.entries, result.error) == (True, 100, None)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for w in (0, 1):
        assert [r["i"] for r in records if r["worker"] == w] == list(range(50))


# --- what a reply carried ----------------------------------------------------------------------


def _with_byte_flipped(content: RecordDict, key: str, index: int) -> RecordDict:
    arrays = content.array_records["arrays"]
    old = arrays[key]
    data = bytearray(old.data)
    data[index] ^= 0x01
    changed = ArrayRecord({k: a for k, a in arrays.items()})
    changed[key] = Array(dtype=old.dtype, shape=old.shape, stype=old.stype, data=bytes(data))
    return RecordDict({**content, "arrays": changed})


def test_payload_sha256_is_stable_and_sees_one_byte(tmp_path: Path) -> None:
    model = _model()
    reply = train_reply(model=model)
    digest = payload_sha256(reply)
    assert digest == payload_sha256(reply) == payload_sha256(train_reply(model=model))
    first = next(iter(reply.array_records["arrays"]))
    assert payload_sha256(_with_byte_flipped(reply, first, -1)) != digest
    metrics = MetricRecord({**reply.metric_records["metrics"], "train-loss": 0.62})
    assert payload_sha256(RecordDict({**reply, "metrics": metrics})) != digest


def test_payload_sha256_follows_its_documented_serialisation() -> None:
    weights = np.arange(6, dtype=np.float32).reshape(2, 3)
    reply = RecordDict(
        {
            "site": ConfigRecord({"name": "site-a"}),
            "arrays": ArrayRecord({"w": Array(weights)}),
            "metrics": MetricRecord({"loss": 0.5, "num-examples": 3}),
        }
    )
    h = hashlib.sha256()

    def field(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "big") + data)

    for part in (b"array", b"arrays", b"1", b"w", b"float32", b"[2,3]", Array(weights).data):
        field(part)
    for part in (b"metric", b"metrics", b'{"loss":0.5,"num-examples":3}'):
        field(part)
    for part in (b"config", b"site", b'{"name":"site-a"}'):
        field(part)
    assert payload_sha256(reply) == h.hexdigest()


def test_describe_reply_lists_what_left(tmp_path: Path) -> None:
    model = _model()
    state = model.state_dict()
    reply = train_reply(model=model)
    entry = describe_reply(reply, run="r1", round=3, message_type="train")
    assert (entry["run"], entry["round"], entry["message_type"]) == ("r1", 3, "train")
    assert [a["name"] for a in entry["arrays"]] == list(state)
    assert {a["record"] for a in entry["arrays"]} == {"arrays"}
    for described, tensor in zip(entry["arrays"], state.values(), strict=True):
        assert described["shape"] == list(tensor.shape)
        assert described["dtype"] == str(tensor.numpy().dtype)
    serialised = sum(len(Array(t.numpy()).data) for t in state.values())
    assert entry["bytes"] == serialised > sum(t.numel() * t.element_size() for t in state.values())
    assert entry["metrics"]["train-loss"] == 0.61
    assert entry["metrics"]["steps"] == 8
    assert entry["configs"]["site"] == {"name": "site-a"}
    assert entry["configs"]["privacy"] == _privacy()
    assert entry["payload_sha256"] == payload_sha256(reply)
    path = tmp_path / "audit.jsonl"
    AuditLog(path).append(entry)
    assert verify(path).ok
