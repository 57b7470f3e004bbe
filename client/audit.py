"""The site's audit trail of what left it, and the guard that decides what may leave.

`AuditLog` appends one JSON line per reply to an append-only file whose lines are hash-chained:
each record carries `prev`, the `hash` of the line before it, and its own `hash`, the SHA-256 of
its canonical JSON without `hash`. Editing, deleting or reordering a line breaks the chain, and
`verify` names the first bad line. A chain can be cut or rewritten from scratch by whoever can
write the file, so the site signs the chain's head after every append and the aggregator
witnesses it (common.audit_head, client.audit_state, which also checks a site's state whole).

`OutboundGuard` refuses a reply that carries anything but numeric arrays named like a model's
parameters, allow-listed finite metrics and allow-listed short config values that look like no
path, e-mail, DICOM person name or patient identifier (and a site name that is a valid one).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.secure import SITE_NAME
from common.sites import identifier_problem, site_name_problem

GENESIS = "0" * 64
_RESERVED = ("seq", "time", "prev", "hash")


def canonical_json(obj: object) -> str:
    """JSON with sorted keys and no spaces; bytes values as {"$bytes": hex}."""
    def default(value: object) -> object:
        if isinstance(value, bytes):
            return {"$bytes": value.hex()}
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=default)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class AuditError(RuntimeError):
    """The audit file cannot be extended without breaking its chain."""


class AuditLog:
    """Append-only, hash-chained JSONL file; safe for several processes appending at once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Write `entry` as the next record of the chain and return the record written."""
        clash = [k for k in _RESERVED if k in entry]
        if clash:
            raise ValueError(f"audit entry may not set {', '.join(clash)}: the log sets them")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as f:
            # Each message is handled by a process of its own: the lock keeps two of them from
            # reading the same last line and forking the chain.
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                seq, prev = _next_link(f, self.path)
                record = {"seq": seq, "time": datetime.now(UTC).isoformat(), **entry, "prev": prev}
                record["hash"] = _sha256(canonical_json(record))
                f.write((canonical_json(record) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return record


def _next_link(f: io.BufferedRandom, path: Path) -> tuple[int, str]:
    """Seq and prev for the next record, from the last line (read backwards: long logs are ok)."""
    pos = f.seek(0, os.SEEK_END)
    buf = b""
    while pos > 0 and buf.rfind(b"\n", 0, len(buf) - 1) < 0:
        step = min(8192, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
    if not buf:
        return 0, GENESIS
    fix = "check the file with verify and move it aside to start a new chain"
    if not buf.endswith(b"\n"):
        raise AuditError(f"{path}: the last line is incomplete (a crash while writing?); {fix}")
    try:
        last = json.loads(buf[buf.rfind(b"\n", 0, len(buf) - 1) + 1 :])
        return int(last["seq"]) + 1, str(last["hash"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AuditError(f"{path}: the last line is not an audit record ({exc}); {fix}") from exc


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of `verify`: `error` names the first bad line; `head` is the last good hash."""

    ok: bool
    entries: int
    error: str | None = None
    head: str = GENESIS


def verify(path: Path) -> VerifyResult:
    """Check every line of an audit file; a missing or empty file is a valid empty chain."""
    path = Path(path)
    if not path.is_file():
        return VerifyResult(ok=True, entries=0)
    prev = GENESIS
    lines = path.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        why, record_hash = _check_line(line, seq=number - 1, prev=prev)
        if why:
            error = f"line {number}: {why}"
            return VerifyResult(ok=False, entries=number - 1, error=error, head=prev)
        prev = record_hash
    return VerifyResult(ok=True, entries=len(lines), head=prev)


def _check_line(line: bytes, *, seq: int, prev: str) -> tuple[str | None, str]:
    """Why one line breaks the chain (None if it does not), and its hash."""
    try:
        record = json.loads(line)
    except ValueError as exc:
        return f"bad JSON ({exc})", ""
    if not isinstance(record, dict) or not {"seq", "prev", "hash"} <= record.keys():
        return "not an audit record (seq, prev and hash are required)", ""
    if record["seq"] != seq:
        return f"seq gap: expected seq {seq}, found {record['seq']!r}", ""
    if record["prev"] != prev:
        return f"prev mismatch: expected {prev}, found {record['prev']!r}", ""
    claimed = record.pop("hash")
    if _sha256(canonical_json(record)) != claimed:
        return "hash mismatch: the record was changed after it was written", ""
    return None, claimed


def _field(h: Any, data: bytes) -> None:
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)


def payload_sha256(content: RecordDict) -> str:
    """SHA-256 of a reply's whole content, recomputable by an auditor from this description.

    The digest is over a sequence of fields, each written as its length (8 bytes, big-endian)
    then its bytes. For each record, in order of record name (Python string order): the kind
    (`array`, `metric` or `config`) and the record name (UTF-8); then for an ArrayRecord, the
    number of arrays (decimal ASCII) and, for each array in the record's own order, its name,
    its dtype string, its shape as canonical JSON (`[3,3]`) and its raw bytes `Array.data` (the
    bytes Flower sends); for a MetricRecord or ConfigRecord, the canonical JSON of the record as
    an object. Canonical JSON is `json.dumps(obj, sort_keys=True, separators=(",", ":"))` with
    Python's other defaults (ASCII escapes; NaN and Infinity written as such), and a bytes value
    written as `{"$bytes": "<hex>"}`. A reply as it travels also carries the signed head of the
    entry that describes it (the `audit-head` record, and `audit-head-*` keys in a legacy
    reply's metrics; client.outbound): the digest is over the reply without them.
    """
    h = hashlib.sha256()
    for name in sorted(content):
        record = content[name]
        if isinstance(record, ArrayRecord):
            _field(h, b"array")
            _field(h, name.encode())
            _field(h, str(len(record)).encode())
            for key, array in record.items():
                for part in (key, array.dtype, canonical_json(list(array.shape))):
                    _field(h, part.encode())
                _field(h, array.data)
        else:
            _field(h, b"metric" if isinstance(record, MetricRecord) else b"config")
            _field(h, name.encode())
            _field(h, canonical_json(dict(record)).encode())
    return h.hexdigest()


def describe_reply(
    content: RecordDict, *, run: str, round: int, message_type: str
) -> dict[str, Any]:
    """The audit entry for a reply: what it carried, and a digest of all of it.

    `metrics` merges every MetricRecord (a key in two records keeps the later by name; the
    digest covers both); `configs` keeps each ConfigRecord under its name, bytes values as
    their size and SHA-256. `bytes` counts array bytes and bytes values.
    """
    arrays: list[dict[str, Any]] = []
    size = 0
    metrics: dict[str, Any] = {}
    configs: dict[str, dict[str, Any]] = {}
    for name in sorted(content):
        record = content[name]
        if isinstance(record, ArrayRecord):
            for key, a in record.items():
                arrays.append({"record": name, "name": key, "shape": [*a.shape], "dtype": a.dtype})
                size += len(a.data)
        elif isinstance(record, MetricRecord):
            metrics.update(record)
        else:
            configs[name] = {key: _summarised(value) for key, value in record.items()}
            size += sum(_opaque_size(value) for value in record.values())
    return {
        "run": run, "round": round, "message_type": message_type, "arrays": arrays,
        "bytes": size, "metrics": metrics, "configs": configs,
        "payload_sha256": payload_sha256(content),
    }


def _opaque_size(value: object) -> int:
    items = value if isinstance(value, list) else [value]
    return sum(len(item) for item in items if isinstance(item, bytes))


def _summarised(value: object) -> object:
    """Bytes (SecAgg+ keys, shares, masked vectors) as their size and digest, not their content.

    The payload's digest covers them; copying them whole would make the trail as large as
    everything that ever left.
    """
    if isinstance(value, bytes):
        return {"bytes": len(value), "sha256": hashlib.sha256(value).hexdigest()}
    if isinstance(value, list) and any(isinstance(v, bytes) for v in value):
        return [_summarised(v) for v in value]
    return value


class OutboundViolation(ValueError):
    """A reply would carry something the site's policy does not let leave."""


MAX_STRING = 64
_FORBIDDEN_CHARS = {"/": "a path", "\\": "a path", "@": "an e-mail", "^": "a DICOM person name"}
DEFAULT_METRICS = frozenset(
    {"train-loss", "num-examples", "train-seconds", "steps", "epsilon",
     "auc", "accuracy", "sensitivity", "specificity", "loss"}
)
DEFAULT_CONFIGS: Mapping[str, frozenset[str]] = MappingProxyType({
    "site": frozenset({"name"}),
    "privacy": frozenset({"epsilon", "target_epsilon", "delta", "noise_multiplier",
                          "sample_rate", "steps", "accountant", "max_grad_norm",
                          "validation_epsilon"}),
})
_NUMERIC_KINDS = "fiu"  # float, signed and unsigned int: what model weights are
# What an array (and an array record) may be called: a model's parameter names, PyTorch
# state-dict keys ("features.0.0.weight", a GAN's "generator.blocks.0.conv.weight"), and the
# keys of Flower's legacy parameters ("0", "1", ..., "_empty"). A name is sent as it is, so a
# file name or a path ("/sites/h1/images/Jensen^Hugo.dcm") must not pass for one.
MAX_ARRAY_NAME = 128
_ARRAY_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
# config values that are a site's name (the Message API's record, the legacy metrics' key)
_SITE_NAME_KEYS = frozenset({("site", "name"), ("fitres.metrics", SITE_NAME),
                             ("evaluateres.metrics", SITE_NAME)})


@dataclass(frozen=True)
class OutboundGuard:
    """What a reply may carry; `allow_nan` lets undefined metrics (AUC of one class) leave."""

    allowed_metrics: frozenset[str]
    allowed_configs: Mapping[str, frozenset[str]]
    allow_nan: bool = field(default=False, kw_only=True)
    # config keys whose values are cryptographic material (SecAgg+ public keys, encrypted
    # shares, masked vectors): bytes or lists of bytes and ints, opaque by construction
    opaque_configs: Mapping[str, frozenset[str]] = field(
        default_factory=lambda: MappingProxyType({}), kw_only=True
    )
    # allowed metrics that may be lists of numbers (a score histogram's counts per bin); every
    # other metric must be one number, so a list of per-image values cannot leave as a metric
    list_metrics: frozenset[str] = field(default=frozenset(), kw_only=True)

    def __post_init__(self) -> None:
        frozen = {name: frozenset(keys) for name, keys in self.allowed_configs.items()}
        opaque = {name: frozenset(keys) for name, keys in self.opaque_configs.items()}
        object.__setattr__(self, "allowed_metrics", frozenset(self.allowed_metrics))
        object.__setattr__(self, "allowed_configs", MappingProxyType(frozen))
        object.__setattr__(self, "opaque_configs", MappingProxyType(opaque))

    def extended(
        self, *, metrics: Iterable[str] = (), configs: Mapping[str, Iterable[str]] | None = None
    ) -> OutboundGuard:
        """A guard that also lets `metrics` and the `configs` record keys leave."""
        merged = {name: set(keys) for name, keys in self.allowed_configs.items()}
        for name, keys in (configs or {}).items():
            merged.setdefault(name, set()).update(keys)
        return OutboundGuard(
            self.allowed_metrics | frozenset(metrics),
            {name: frozenset(keys) for name, keys in merged.items()},
            allow_nan=self.allow_nan, opaque_configs=self.opaque_configs,
            list_metrics=self.list_metrics,
        )

    def check(self, content: RecordDict) -> None:
        """Raise OutboundViolation naming the first record/key the policy does not allow."""
        for name in sorted(content):
            record = content[name]
            if isinstance(record, ArrayRecord):
                _check_array_name(f"array record {name!r}", name)
                for key, array in record.items():
                    where = f"array record {name!r}, array {key!r}"
                    _check_array_name(where, key)
                    _check_array(where, array)
            elif isinstance(record, MetricRecord):
                for key, value in record.items():
                    self._check_metric(f"metric record {name!r}, key {key!r}", key, value)
            elif isinstance(record, ConfigRecord) and name in self.opaque_configs:
                for key, setting in record.items():
                    where = f"config record {name!r}, key {key!r}"
                    if key not in self.opaque_configs[name]:
                        raise OutboundViolation(f"{where} is not allowed to leave the site")
                    _check_opaque_value(where, setting)
            elif isinstance(record, ConfigRecord):
                if name not in self.allowed_configs:
                    raise OutboundViolation(
                        f"config record {name!r} may not leave the site (allowed: "
                        f"{sorted(self.allowed_configs)}); add it with OutboundGuard.extended"
                    )
                for key, setting in record.items():
                    where = f"config record {name!r}, key {key!r}"
                    if key not in self.allowed_configs[name]:
                        raise OutboundViolation(f"{where} is not allowed to leave the site")
                    _check_config_value(where, setting, site_name=(name, key) in _SITE_NAME_KEYS)
            else:
                raise OutboundViolation(f"record {name!r}: unknown type {type(record).__name__}")

    def _check_metric(self, where: str, key: str, value: object) -> None:
        if key not in self.allowed_metrics:
            raise OutboundViolation(
                f"{where} is not an allowed metric; add it with OutboundGuard.extended"
            )
        if isinstance(value, list) and key not in self.list_metrics:
            raise OutboundViolation(
                f"{where} is a list; only {sorted(self.list_metrics) or 'no metric'} may be "
                "(counts per bin), every other metric is one number"
            )
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise OutboundViolation(f"{where}: {type(v).__name__} is not a number")
            if not math.isfinite(v) and not (self.allow_nan and math.isnan(v)):
                raise OutboundViolation(f"{where}: {v} is not a finite number")


def _check_array_name(where: str, name: str) -> None:
    """A parameter-like name: dotted identifiers, at most MAX_ARRAY_NAME characters."""
    if len(name) > MAX_ARRAY_NAME or not _ARRAY_NAME.match(name):
        raise OutboundViolation(
            f"{where}: the name must be a model parameter's (letters, digits, '_' and '-' in "
            f"'.'-separated parts, at most {MAX_ARRAY_NAME} characters), not a path or file name"
        )
    why = identifier_problem(name)
    if why:
        raise OutboundViolation(f"{where}: the name looks like a patient identifier: it {why}")


def _check_array(where: str, array: Array) -> None:
    """Numeric dtype, and bytes that are exactly one .npy array of the declared dtype and shape.

    Bytes after the array, or a header that is not the one `np.save` writes for the declared
    dtype and shape (a header can be padded with anything), could carry anything out. Every
    byte pattern is a valid number of a numeric dtype, so the payload itself needs no decoding:
    the check compares the header and the length, without copying the array.
    """
    try:
        declared = np.dtype(array.dtype)
    except TypeError as exc:
        raise OutboundViolation(f"{where}: unknown dtype {array.dtype!r}") from exc
    if declared.kind not in _NUMERIC_KINDS:
        raise OutboundViolation(f"{where}: dtype {array.dtype} is not a float or int dtype")
    if array.stype != "numpy.ndarray":
        raise OutboundViolation(f"{where}: serialisation {array.stype!r} cannot be checked")
    shape = tuple(int(d) for d in array.shape)
    size = declared.itemsize * math.prod(shape)
    data = array.data
    if not any(
        len(data) == len(header) + size and data.startswith(header)
        for header in _npy_headers(declared, shape)
    ):
        raise OutboundViolation(
            f"{where}: bytes hold {_npy_description(data)} in {len(data)} bytes, "
            f"not exactly the declared {array.dtype} {shape}"
        )


@functools.lru_cache(maxsize=4096)
def _npy_headers(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[bytes, bytes]:
    """The headers `np.save` writes for an array of `dtype` and `shape`: C and Fortran order."""
    headers = []
    for fortran_order in (False, True):
        fields = {
            "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran_order,
            "shape": shape,
        }
        out = io.BytesIO()
        # format 1.0 holds any numeric dtype's header (at most 64 dimensions): np.save's choice
        np.lib.format.write_array_header_1_0(out, fields)
        headers.append(out.getvalue())
    return headers[0], headers[1]


def _npy_description(data: bytes) -> str:
    """What a .npy header says it holds, for the violation's message."""
    try:
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(stream)  # a claim to describe, not to trust
    except (ValueError, OSError, SyntaxError) as exc:
        return f"no readable .npy header ({exc})"
    return f"{dtype} {shape}"


def _check_opaque_value(where: str, value: object) -> None:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, bytes | int):
            raise OutboundViolation(
                f"{where}: only bytes and integers (keys, shares, masked vectors) may leave, "
                f"not {type(item).__name__}"
            )


def _check_config_value(where: str, value: object, *, site_name: bool = False) -> None:
    if isinstance(value, bool | int | float):
        return
    if not isinstance(value, str):
        raise OutboundViolation(f"{where}: {type(value).__name__} values may not leave the site")
    if len(value) > MAX_STRING or not value.isprintable():
        raise OutboundViolation(
            f"{where}: strings must be printable and at most {MAX_STRING} characters"
        )
    for char, looks_like in _FORBIDDEN_CHARS.items():
        if char in value:
            raise OutboundViolation(f"{where}: {value!r} looks like {looks_like} ({char!r})")
    why = site_name_problem(value) if site_name else identifier_problem(value)
    if why:
        what = "site name" if site_name else "value"
        raise OutboundViolation(f"{where}: the {what} {why}")


DEFAULT_GUARD = OutboundGuard(DEFAULT_METRICS, DEFAULT_CONFIGS)


def scan_for_identifiers(content: RecordDict, identifiers: Iterable[str]) -> list[str]:
    """Which `identifiers` appear in the reply's names, string or bytes values, or array bytes.

    Each identifier is looked for as UTF-8 and as UTF-32-LE (how numpy stores str arrays).
    """
    haystacks: list[bytes] = []
    for name, record in content.items():
        haystacks.append(name.encode())
        items: Iterable[tuple[str, object]] = record.items()
        for key, value in items:
            haystacks.append(key.encode())
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, Array):
                    haystacks += [v.dtype.encode(), v.data]
                elif isinstance(v, str):
                    haystacks.append(v.encode())
                elif isinstance(v, bytes):
                    haystacks.append(v)
    found = []
    for ident in dict.fromkeys(identifiers):
        needles = [ident.encode(), ident.encode("utf-32-le")]
        if ident and any(n in h for h in haystacks for n in needles):
            found.append(ident)
    return found
