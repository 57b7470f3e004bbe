"""The outbound guard: what a site's reply may carry, and the identifiers the scan finds."""

import hashlib
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.audit import (
    DEFAULT_CONFIGS,
    DEFAULT_GUARD,
    DEFAULT_METRICS,
    OutboundGuard,
    OutboundViolation,
    describe_reply,
    scan_for_identifiers,
)
from tests.client.replies import evaluate_reply, train_reply

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
    "list-metric": (  # only a score histogram's counts may be a list (client.outbound's guard)
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

    from client.outbound import GUARD

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
    from client.outbound import GUARD
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
