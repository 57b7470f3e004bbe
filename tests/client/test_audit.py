import hashlib
import json
import math
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.audit import (
    DEFAULT_CONFIGS,
    DEFAULT_GUARD,
    DEFAULT_METRICS,
    GENESIS,
    AuditError,
    AuditLog,
    OutboundGuard,
    OutboundViolation,
    describe_reply,
    payload_sha256,
    scan_for_identifiers,
    verify,
)
from common.privacy import PrivacyState
from models import build_model

# --- replies built the way client/app.py builds them -------------------------------------------


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", in_channels=1, num_classes=2, image_size=32)


def _privacy() -> dict[str, float | int | str]:
    state = PrivacyState(
        noise_multiplier=1.1, sample_rate=0.25, planned_steps=40, target_epsilon=8.0,
        delta=1e-5, accountant="rdp", max_grad_norm=1.0, history=[(1.1, 0.25, 8)],
    )
    return state.summary()


def train_reply(site: str = "site-a", model: torch.nn.Module | None = None) -> RecordDict:
    summary = _privacy()
    metrics = {
        "epsilon": float(summary["epsilon"]), "train-loss": 0.61, "num-examples": 32,
        "train-seconds": 1.5, "steps": 8,
    }
    return RecordDict(
        {
            "privacy": ConfigRecord(dict(summary)),
            "arrays": ArrayRecord((model or _model()).cpu().state_dict()),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"name": site}),
        }
    )


def evaluate_reply(site: str = "site-a") -> RecordDict:
    metrics = {
        "auc": 0.81, "accuracy": 0.75, "sensitivity": 0.7, "specificity": 0.8, "loss": 0.52,
        "num-examples": 12,
    }
    return RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site})})


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


# --- the outbound guard ------------------------------------------------------------------------


def test_guard_accepts_realistic_train_and_evaluate_replies() -> None:
    DEFAULT_GUARD.check(train_reply())
    DEFAULT_GUARD.check(evaluate_reply())


def _replace(content: RecordDict, name: str, record) -> RecordDict:
    return RecordDict({**content, name: record})


def _trailing_bytes() -> Array:
    ok = Array(np.zeros(4, dtype=np.float32))
    return Array(dtype=ok.dtype, shape=ok.shape, stype=ok.stype, data=ok.data + b"Doe^John")


def _junk_in_header() -> Array:
    """The header's space padding carries a name: same length, still a parseable header."""
    ok = Array(np.zeros(4, dtype=np.float32))
    end = ok.data.index(b"}") + 1
    data = ok.data[:end] + b" Doe^John" + ok.data[end + 9 :]
    return Array(dtype=ok.dtype, shape=ok.shape, stype=ok.stype, data=data)


def _declared_other_shape() -> Array:
    ok = Array(np.zeros(4, dtype=np.float32))
    return Array(dtype=ok.dtype, shape=(2, 2), stype=ok.stype, data=ok.data)


REJECTED = {
    "metric-not-allowed": (
        lambda r: _replace(r, "metrics", MetricRecord({"patient-age": 54.0})),
        "metric record 'metrics', key 'patient-age'",
    ),
    "nan-metric": (
        lambda r: _replace(r, "metrics", MetricRecord({"auc": math.nan})),
        "key 'auc': nan is not a finite number",
    ),
    "inf-metric": (
        lambda r: _replace(r, "metrics", MetricRecord({"loss": math.inf})),
        "key 'loss': inf",
    ),
    "list-metric": (  # only a score histogram's counts may be a list (client.app's guard)
        lambda r: _replace(r, "metrics", MetricRecord({"loss": [0.1, 0.2]})),
        "key 'loss' is a list",
    ),
    "path": (
        lambda r: _replace(r, "site", ConfigRecord({"name": "/data/site/img001.dcm"})),
        "config record 'site', key 'name'.*a path",
    ),
    "windows-path": (
        lambda r: _replace(r, "site", ConfigRecord({"name": "C:\\scans\\001"})),
        "a path",
    ),
    "person-name": (
        lambda r: _replace(r, "site", ConfigRecord({"name": "Doe^John"})),
        "key 'name'.*DICOM person name",
    ),
    "email": (
        lambda r: _replace(r, "site", ConfigRecord({"name": "jdoe@hospital.org"})),
        "e-mail",
    ),
    "long-string": (
        lambda r: _replace(r, "site", ConfigRecord({"name": "x" * 65})),
        "at most 64 characters",
    ),
    "bytes-value": (
        lambda r: _replace(r, "site", ConfigRecord({"name": b"site-a"})),
        "bytes values may not leave",
    ),
    "config-key-not-allowed": (
        lambda r: _replace(r, "site", ConfigRecord({"name": "site-a", "city": "Lyon"})),
        "config record 'site', key 'city' is not allowed",
    ),
    "unknown-config-record": (
        lambda r: _replace(r, "header", ConfigRecord({"modality": "CT"})),
        "config record 'header' may not leave",
    ),
    "str-array": (
        lambda r: _replace(r, "extra", ArrayRecord({"names": Array(np.array(["Doe^John"]))})),
        "array record 'extra', array 'names': dtype <U8 is not a float or int dtype",
    ),
    "object-array": (
        lambda r: _replace(
            r, "extra",
            ArrayRecord({"o": Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=b"")}),
        ),
        "array 'o': dtype object is not a float or int dtype",
    ),
    "bytes-after-array": (
        lambda r: _replace(r, "extra", ArrayRecord({"w": _trailing_bytes()})),
        "array 'w': bytes hold float32",
    ),
    "junk-in-header-padding": (
        lambda r: _replace(r, "extra", ArrayRecord({"w": _junk_in_header()})),
        "array 'w': bytes hold .* not exactly the declared float32",
    ),
    "header-disagrees-with-declared-shape": (
        lambda r: _replace(r, "extra", ArrayRecord({"w": _declared_other_shape()})),
        r"array 'w': bytes hold float32 \(4,\) in .* not exactly the declared float32 \(2, 2\)",
    ),
    # issue 18: array names are sent as they are, so they are checked like any string
    "path-as-array-name": (
        lambda r: _replace(r, "arrays", ArrayRecord(
            {"/sites/h1/images/Jensen^Hugo.dcm": Array(np.zeros(2, dtype=np.float32))}
        )),
        "array '/sites/h1/images/Jensen\\^Hugo.dcm': the name must be a model parameter's",
    ),
    "file-name-as-array-name": (
        lambda r: _replace(r, "arrays", ArrayRecord(
            {"Jensen Hugo.dcm": Array(np.zeros(2, dtype=np.float32))}
        )),
        "the name must be a model parameter's",
    ),
    "record-number-as-array-name": (
        lambda r: _replace(r, "arrays", ArrayRecord(
            {"head.A0383114630": Array(np.zeros(2, dtype=np.float32))}
        )),
        "the name looks like a patient identifier: it holds the number '0383114630'",
    ),
    "overlong-array-name": (
        lambda r: _replace(r, "arrays", ArrayRecord(
            {"layer." * 30 + "weight": Array(np.zeros(2, dtype=np.float32))}
        )),
        "at most 128 characters",
    ),
    "path-as-array-record-name": (
        lambda r: _replace(r, "/data/Doe", ArrayRecord({"w": Array(np.zeros(2, np.float32))})),
        "array record '/data/Doe': the name must be a model parameter's",
    ),
    "patient-as-site-name": (
        lambda r: _replace(r, "site", ConfigRecord({"name": "Jensen Hugo MRN A0383114630"})),
        "config record 'site', key 'name': the site name must be 1-64 letters",
    ),
    "record-number-in-site-name": (
        lambda r: _replace(r, "site", ConfigRecord({"name": "Jensen_Hugo_MRN_A0383114630"})),
        "the site name looks like a patient identifier",
    ),
    "record-number-in-a-string": (
        lambda r: _replace(r, "privacy", ConfigRecord({"accountant": "MRN 0383114630"})),
        "config record 'privacy', key 'accountant': the value holds the number",
    ),
}


@pytest.mark.parametrize("task", ["classify", "segment", "autoencode", "synthesize"])
def test_guard_accepts_every_tasks_parameter_names(task: str) -> None:
    from common.config import RunConfig
    from common.training.tasks import get_task

    model = get_task(task).build(RunConfig(task=task, image_size=32))
    DEFAULT_GUARD.check(train_reply(model=model))


def test_guard_accepts_every_layout_np_save_writes() -> None:
    big = np.arange(12, dtype=np.float64).reshape(3, 4)
    arrays = {
        "fortran": Array(np.asfortranarray(big)),
        "scalar": Array(np.array(3, dtype=np.int64)),
        "empty": Array(np.zeros((0, 5), dtype=np.float16)),
        "many-dims": Array(np.zeros((1,) * 32 + (2,), dtype=np.uint8)),
    }
    DEFAULT_GUARD.check(_replace(train_reply(), "extra", ArrayRecord(arrays)))


@pytest.mark.parametrize("case", list(REJECTED))
def test_guard_rejects(case: str) -> None:
    change, message = REJECTED[case]
    with pytest.raises(OutboundViolation, match=message):
        DEFAULT_GUARD.check(change(train_reply()))


def test_guard_can_be_extended_and_let_undefined_metrics_through() -> None:
    reply = _replace(evaluate_reply(), "metrics", MetricRecord({"dice": 0.7, "auc": math.nan}))
    with pytest.raises(OutboundViolation, match="'dice'"):
        DEFAULT_GUARD.check(reply)
    guard = OutboundGuard(DEFAULT_METRICS, DEFAULT_CONFIGS, allow_nan=True).extended(
        metrics={"dice"}, configs={"site": {"region"}}
    )
    guard.check(reply)
    guard.check(_replace(reply, "site", ConfigRecord({"name": "site-a", "region": "north"})))
    with pytest.raises(OutboundViolation, match="inf"):
        guard.check(_replace(reply, "metrics", MetricRecord({"auc": math.inf})))
    assert "dice" not in DEFAULT_GUARD.allowed_metrics


# --- identifiers -------------------------------------------------------------------------------

IDENTIFIERS = ["Doe^John", "MRN00123456", "1.2.840.113619.2.55.3"]


def test_scan_finds_nothing_in_a_clean_reply() -> None:
    assert scan_for_identifiers(train_reply(), IDENTIFIERS) == []
    assert scan_for_identifiers(evaluate_reply(), IDENTIFIERS) == []


def test_scan_finds_an_identifier_in_a_config_value() -> None:
    reply = train_reply(site="north-MRN00123456")
    assert scan_for_identifiers(reply, IDENTIFIERS) == ["MRN00123456"]
    # the guard refuses it too: a site name holding a record number (issue 18)
    with pytest.raises(OutboundViolation, match="site name looks like a patient identifier"):
        DEFAULT_GUARD.check(reply)


def test_scan_finds_an_identifier_in_array_bytes() -> None:
    smuggled = np.frombuffer(b"xx Doe^John xx", dtype=np.uint8)
    reply = _replace(train_reply(), "extra", ArrayRecord({"w": Array(smuggled)}))
    assert scan_for_identifiers(reply, IDENTIFIERS) == ["Doe^John"]
    as_str = _replace(train_reply(), "extra", ArrayRecord({"w": Array(np.array(["Doe^John"]))}))
    assert scan_for_identifiers(as_str, IDENTIFIERS) == ["Doe^John"]


def test_secure_aggregation_replies_pass_the_site_guard_and_nothing_else_does() -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    from client.app import GUARD

    masked = np.arange(12, dtype=np.int64).tobytes()
    shares = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(
        {"nids": [3, 5, 9], "shares": [b"\x01\x02", b"\x03"], "masked_params": [masked]}
    )})
    GUARD.check(shares)
    # the audit keeps their size and digest, not the cryptographic material itself
    entry = describe_reply(shares, run="r", round=1, message_type="train/secagg-unmask")
    assert entry["configs"][RECORD_KEY_CONFIGS]["masked_params"] == [
        {"bytes": len(masked), "sha256": hashlib.sha256(masked).hexdigest()}
    ]
    assert entry["bytes"] == len(masked) + 3
    # text under a protocol key, or a key the protocol does not have, is refused
    for content in (
        {"shares": ["Doe^Jane"]},
        {"patient": [b"x"]},
        {"nids": [1.5]},
    ):
        with pytest.raises(OutboundViolation):
            GUARD.check(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(content)}))
    # the flattened legacy reply of a SecAgg+ round: only allow-listed metrics, as always
    legacy = RecordDict({
        "fitres.metrics": ConfigRecord({"train-loss": 0.3, "site-name": "hospital-a",
                                        "privacy-epsilon": 1.2}),
        "fitres.status": ConfigRecord({"code": 0, "message": ""}),
        "fitres.num_examples": MetricRecord({"num_examples": 40}),
    })
    GUARD.check(legacy)
    legacy["fitres.metrics"]["path"] = "/data/scan.dcm"
    with pytest.raises(OutboundViolation):
        GUARD.check(legacy)


def test_the_site_guard_passes_a_fingerprint_and_nothing_per_image() -> None:
    # a segmentation run's fingerprint (client.fingerprint) leaves as aggregates only
    from client.app import GUARD
    from common.fingerprint import Fingerprint

    fp = Fingerprint(train_images=40, val_images=10, rows=512.0, cols=512.0, slices=1.0,
                     spacing_row=math.nan, spacing_col=math.nan, max_label=2,
                     class_shares=(40.1, 6.2, 3.7), shares_noise=3.0)
    reply = RecordDict({"metrics": MetricRecord(dict(fp.to_metrics())),
                        "site": ConfigRecord({"name": "site-a"})})
    GUARD.check(reply)
    # a list under any other key would be one value per image: blocked
    per_image = dict(fp.to_metrics())
    per_image["fp-rows"] = [512.0, 480.0, 512.0]
    with pytest.raises(OutboundViolation):
        GUARD.check(_replace(reply, "metrics", MetricRecord(per_image)))
    with pytest.raises(OutboundViolation):
        GUARD.check(_replace(reply, "metrics", MetricRecord(
            {**fp.to_metrics(), "fp-patient-sizes": [512.0]})))
