"""A site's audit state: the hash-chained trail, its signed head, and the check of both.

    STATE/audit.jsonl   one entry per reply that left (client.audit.AuditLog)
    STATE/audit.head    the trail's signed head after the last append (common.audit_head)
    STATE/audit.pub     the key that signs this trail, pinned at the first append
    STATE/audit.key     the signing key of a site without a kit (a simulated site), 0600
    STATE/audit.lock    serialises append-and-sign across the ClientApp's processes

`verify_state` is what `medfed site audit --verify` runs. A trail is intact when its chain holds,
it ends exactly in its signed head, the head's signature holds under the pinned key (and the
kit's, when given), and every head the aggregator witnessed (results.json) is an entry of it.
Where the signing key lives in the state folder (simulation), whoever can write the folder can
re-sign a rewritten trail: there the aggregator's witness is what shows it.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from client import progress
from client.approval import LAUNCHER_DIR
from client.audit import AuditLog, verify
from common.atomic import write_bytes, write_text
from common.audit_head import (
    ChainHead,
    HeadError,
    load_signing_key,
    new_signing_key,
    public_line,
)

TRAIL, HEAD, PIN, KEY, LOCK = "audit.jsonl", "audit.head", "audit.pub", "audit.key", "audit.lock"
# what only a site's state folder holds: one of these tells it from a mistyped path
_STATE_MARKS = (TRAIL, HEAD, PIN, KEY, progress.FILE, "privacy", LAUNCHER_DIR)


class TrailAltered(RuntimeError):
    """The trail, or its head, is not what the site wrote; the message says what differs."""


class NotSiteState(ValueError):
    """The folder (or the witness file) is not what the check needs; the message says why."""


# --- writing ------------------------------------------------------------------------------------


def signing_key(state_dir: Path, key_path: Path | None) -> ec.EllipticCurvePrivateKey:
    """The site's kit key at `key_path`, else the state folder's own (made on first use)."""
    if key_path is not None:
        return load_signing_key(key_path)
    path = state_dir / KEY
    if not path.is_file():
        state_dir.mkdir(parents=True, exist_ok=True)
        _, private = new_signing_key()
        try:
            write_bytes(path, private, exclusive=True)
        except FileExistsError:
            pass  # another process made one meanwhile: its key is the site's
    return load_signing_key(path)


def append_signed(
    state_dir: Path, entry: Mapping[str, Any], *, key: ec.EllipticCurvePrivateKey
) -> ChainHead:
    """Append `entry` to the trail, then sign and store the new head; returns the head.

    One lock covers both, so the head on disk is always the head of the trail (the ClientApp
    handles each message in a process of its own).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / LOCK).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (state_dir / PIN).exists():
                write_text(state_dir / PIN, public_line(key) + "\n")
            record = AuditLog(state_dir / TRAIL).append(entry)
            head = ChainHead.sign(key, seq=int(record["seq"]), hash_hex=str(record["hash"]))
            write_text(state_dir / HEAD, json.dumps(head.to_json(), indent=2) + "\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return head


# --- checking -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateReport:
    """What an intact state holds: entries, its head (None: nothing sent yet), heads witnessed."""

    entries: int
    head: ChainHead | None
    witnessed: int = 0

    def summary(self, state_dir: Path) -> str:
        """One line for `medfed site audit --verify`."""
        if self.head is None:
            return f"{state_dir}: no replies sent yet (no audit trail; the folder is a site state)"
        text = (
            f"{state_dir / TRAIL}: {self.entries} entries, chain intact, ends in its signed head "
            f"(seq {self.head.seq}, {self.head.hash[:16]}..., key {self.head.fingerprint})"
        )
        if self.witnessed:
            text += f"; the {self.witnessed} heads the aggregator witnessed are in it"
        return text


def verify_state(
    state_dir: Path, *, site_key: str | None = None, witness: Path | None = None,
    site: str | None = None,
) -> StateReport:
    """Check a site's audit state; TrailAltered or NotSiteState say what is wrong.

    Args:
        site_key: the site's public key (an OpenSSH line, e.g. its kit's site.pub) the head
            must be signed with, on top of the key pinned in the state.
        witness: a run's results.json; every head it recorded for the site must be in the trail.
        site: the site's name in `witness` [default: the state folder's name].

    """
    _check_is_state(state_dir)
    trail = state_dir / TRAIL
    chain = verify(trail)
    if not chain.ok:
        raise TrailAltered(f"{trail}: the hash chain is broken at {chain.error}")
    hashes = _hashes(trail)
    head = _read_head(state_dir)
    name = site or state_dir.resolve().name
    if head is None:
        _check_never_sent(state_dir, trail)
        if witness is not None and _witnessed(witness, name):
            raise TrailAltered(
                f"{state_dir}: no audit trail, but --witness {witness} records replies from "
                f"site {name}: the trail and its head were deleted"
            )
        return StateReport(0, None)
    _check_key(state_dir, head, site_key)
    _check_ends_in(trail, hashes, head)
    witnessed = 0
    if witness is not None:
        witnessed = _check_witness(witness, name, head, hashes)
    return StateReport(len(hashes), head, witnessed)


def _check_is_state(state_dir: Path) -> None:
    if not state_dir.is_dir():
        raise NotSiteState(
            f"--state {state_dir}: no such folder; pass the folder `medfed site --state` uses "
            "(default ~/.medfed/sites/<site>) or a simulation's RUN_DIR/site-state/<site>"
        )
    if not any((state_dir / mark).exists() for mark in _STATE_MARKS):
        raise NotSiteState(
            f"--state {state_dir}: not a site's state folder (it holds none of "
            f"{', '.join(_STATE_MARKS)}); check the path"
        )


def _hashes(trail: Path) -> list[str]:
    """Each entry's hash, in order (the chain was verified first)."""
    if not trail.is_file():
        return []
    return [str(json.loads(line)["hash"]) for line in trail.read_bytes().splitlines() if line]


def _read_head(state_dir: Path) -> ChainHead | None:
    path = state_dir / HEAD
    if not path.exists():
        return None
    try:
        return ChainHead.from_json(json.loads(path.read_bytes()), where=str(path))
    except (ValueError, HeadError) as exc:
        raise TrailAltered(f"{path}: the signed head is unreadable ({exc})") from None


def _check_never_sent(state_dir: Path, trail: Path) -> None:
    """No head: fine only if nothing says a reply was ever sent."""
    if trail.exists():
        raise TrailAltered(
            f"{state_dir / HEAD} is missing, so {trail} cannot be checked against its signed "
            "head (it was deleted, or the trail was written by a medfed without signed heads)"
        )
    if (state_dir / PIN).exists():
        raise TrailAltered(
            f"{trail} and {state_dir / HEAD} are missing, but {state_dir / PIN} shows this "
            "site signed a trail: the trail and its head were deleted"
        )
    done = progress.read(state_dir)
    if done:
        raise TrailAltered(
            f"{trail} and {state_dir / HEAD} are missing, but {state_dir / progress.FILE} "
            f"records {len(done)} trainings or evaluations: the trail and its head were deleted"
        )


def _check_key(state_dir: Path, head: ChainHead, site_key: str | None) -> None:
    where = state_dir / HEAD
    if not head.signature_ok():
        raise TrailAltered(
            f"{where}: the signature does not match seq {head.seq} and its hash: the head was "
            "edited"
        )
    expected: list[tuple[str, str]] = []
    if site_key is not None:
        expected.append(("the kit's site.pub", site_key))
    pin = state_dir / PIN
    if not pin.is_file():
        raise TrailAltered(f"{pin} is missing: the key this trail is signed with was removed")
    expected.append((str(pin), pin.read_text()))
    if (state_dir / KEY).is_file():
        own = load_signing_key(state_dir / KEY)
        expected.append((str(state_dir / KEY), public_line(own)))
    for source, line in expected:
        if not head.same_key(line):
            raise TrailAltered(
                f"{where} is signed by another key ({head.fingerprint}) than this site's "
                f"({source}): the head was replaced"
            )


def _check_ends_in(trail: Path, hashes: list[str], head: ChainHead) -> None:
    written = head.seq + 1
    if not trail.exists():
        raise TrailAltered(
            f"{trail} is missing, but its signed head says {written} entries were written: "
            "the trail was deleted"
        )
    if not hashes:
        raise TrailAltered(
            f"{trail} is empty, but its signed head says {written} entries were written: the "
            "trail was emptied"
        )
    if len(hashes) < written:
        raise TrailAltered(
            f"{trail} ends at entry {len(hashes) - 1}, but its signed head is entry {head.seq}: "
            f"the last {written - len(hashes)} entries were cut"
        )
    if len(hashes) > written:
        raise TrailAltered(
            f"{trail} has {len(hashes) - written} entries after its signed head (entry "
            f"{head.seq}): added without the site's key, or a crash between writing an entry "
            "and signing it"
        )
    if hashes[head.seq] != head.hash:
        raise TrailAltered(
            f"{trail}: entry {head.seq} is not the one its signed head names (hash "
            f"{hashes[head.seq][:16]}..., signed {head.hash[:16]}...): the trail was rewritten"
        )


def _witnessed(witness: Path, site: str) -> list[tuple[str, Any]]:
    """(where, head as JSON) for each head of the site a results.json recorded.

    One per round, and the reply to the run's closing cross-site evaluation (server.cross_site).
    """
    try:
        results = json.loads(witness.read_text())
        rounds = results["rounds"]
        seen = [
            (f"round {int(r['round'])}", r["audit_heads"][site]) for r in rounds
            if site in (r.get("audit_heads") or {})
        ]
        closing = ((results.get("cross_site") or {}).get("audit_heads") or {}).get(site)
        return seen + ([("the cross-site evaluation", closing)] if closing else [])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NotSiteState(
            f"--witness {witness}: not a run's results.json ({type(exc).__name__}: {exc})"
        ) from None


def _check_witness(witness: Path, site: str, head: ChainHead, hashes: list[str]) -> int:
    seen = _witnessed(witness, site)
    if not seen:
        raise NotSiteState(
            f"--witness {witness}: records no audit head of site {site!r} (another run's "
            "results, a run this site took no part in, or pass the site's name with --site)"
        )
    for label, raw in seen:
        where = f"--witness {witness}, {label}"
        try:
            witnessed = ChainHead.from_json(raw, where=where)
        except HeadError as exc:
            raise NotSiteState(str(exc)) from None
        if not witnessed.signature_ok():
            raise TrailAltered(f"{where}: the witnessed head's signature does not hold")
        if not witnessed.same_key(head.public_key):
            raise TrailAltered(
                f"{where}: the aggregator saw heads signed by {witnessed.fingerprint}, but "
                f"this trail is signed by {head.fingerprint}: the trail was re-signed"
            )
        if witnessed.seq >= len(hashes):
            raise TrailAltered(
                f"{where}: the aggregator witnessed entry {witnessed.seq}, but the trail ends "
                f"at entry {len(hashes) - 1}: entries were cut"
            )
        if hashes[witnessed.seq] != witnessed.hash:
            raise TrailAltered(
                f"{where}: entry {witnessed.seq} is not the one the aggregator witnessed "
                f"(hash {hashes[witnessed.seq][:16]}..., witnessed {witnessed.hash[:16]}...): "
                "the trail was rewritten"
            )
    return len(seen)
