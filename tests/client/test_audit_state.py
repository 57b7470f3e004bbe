"""The audit trail cannot be cut, emptied, deleted or rewritten unseen (issue 18).

Each attack is done as an attacker with write access to the site's state folder would do it,
then checked with the real `medfed site audit --verify`.
"""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.audit import AuditLog, describe_reply
from client.audit_state import HEAD, KEY, PIN, TRAIL, append_signed, signing_key
from common.audit_head import HEAD_RECORD, ChainHead, load_signing_key, new_signing_key
from medfed.cli import app
from server.federation import RoundLog
from tests.client.replies import evaluate_reply, train_reply

SITE = "site-a"


def _send(state: Path, rounds: int = 2, key_path: Path | None = None) -> list[ChainHead]:
    """What the ClientApp's outbound mod writes for `rounds` rounds of train + evaluate."""
    heads = []
    for r in range(1, rounds + 1):
        for kind, reply in (("train", train_reply(SITE)), ("evaluate", evaluate_reply(SITE))):
            entry = describe_reply(reply, run="run-1", round=r, message_type=kind)
            heads.append(append_signed(state, entry, key=signing_key(state, key_path)))
    return heads


@pytest.fixture()
def state(tmp_path: Path) -> Path:
    folder = tmp_path / "site-state" / SITE
    _send(folder)
    return folder


def _verify(state: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["site", "audit", "--state", str(state), "--verify", *extra])
    return result.exit_code, " ".join(result.output.split())


def _lines(state: Path) -> list[str]:
    return (state / TRAIL).read_text().splitlines()


def _rechain(state: Path, entries: list[dict]) -> None:
    """Write a new, internally valid chain with the shipped AuditLog."""
    (state / TRAIL).unlink()
    log = AuditLog(state / TRAIL)
    for entry in entries:
        log.append({k: v for k, v in entry.items() if k not in ("seq", "time", "prev", "hash")})


def _witness(tmp_path: Path, heads: list[ChainHead]) -> Path:
    """A results.json as the aggregator writes it: each round's latest head of the site."""
    rounds = [{"round": i + 1, "audit_heads": {SITE: h.to_json()}} for i, h in enumerate(heads)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rounds": rounds}))
    return path


def test_an_untouched_trail_verifies(state: Path) -> None:
    code, output = _verify(state)
    assert code == 0, output
    assert "4 entries, chain intact, ends in its signed head (seq 3" in output
    head = json.loads((state / HEAD).read_text())
    assert head["seq"] == 3 and head["hash"] == json.loads(_lines(state)[-1])["hash"]
    assert ChainHead.from_json(head, where="head").signature_ok()


def test_cutting_the_last_entry_fails(state: Path) -> None:
    (state / TRAIL).write_text("\n".join(_lines(state)[:-1]) + "\n")
    code, output = _verify(state)
    assert code == 1, output
    assert "ends at entry 2, but its signed head is entry 3: the last 1 entries were cut" in output


def test_emptying_the_trail_fails(state: Path) -> None:
    (state / TRAIL).write_text("")
    code, output = _verify(state)
    assert code == 1 and "the trail was emptied" in output, output


def test_deleting_the_trail_fails(state: Path) -> None:
    (state / TRAIL).unlink()
    code, output = _verify(state)
    assert code == 1 and "the trail was deleted" in output, output


def test_deleting_the_trail_and_its_head_fails(state: Path) -> None:
    (state / TRAIL).unlink()
    (state / HEAD).unlink()
    code, output = _verify(state)
    assert code == 1 and "the trail and its head were deleted" in output, output


def test_rechaining_with_the_shipped_audit_log_fails(state: Path) -> None:
    entries = [json.loads(line) for line in _lines(state)]
    entries[1]["metrics"]["auc"] = 0.99  # rewrite what left, keep the count
    _rechain(state, entries)
    code, output = _verify(state)
    assert code == 1, output
    assert "entry 3 is not the one its signed head names" in output
    assert "the trail was rewritten" in output


def test_a_head_edited_to_match_a_cut_trail_fails(state: Path) -> None:
    lines = _lines(state)[:-1]
    (state / TRAIL).write_text("\n".join(lines) + "\n")
    head = json.loads((state / HEAD).read_text())
    head.update(seq=2, hash=json.loads(lines[-1])["hash"])
    (state / HEAD).write_text(json.dumps(head))
    code, output = _verify(state)
    assert code == 1 and "the head was edited" in output, output


def test_a_head_signed_by_another_key_fails(state: Path) -> None:
    lines = _lines(state)[:-1]
    (state / TRAIL).write_text("\n".join(lines) + "\n")
    other, _ = new_signing_key()
    forged = ChainHead.sign(other, seq=2, hash_hex=json.loads(lines[-1])["hash"])
    (state / HEAD).write_text(json.dumps(forged.to_json()))
    code, output = _verify(state)
    assert code == 1, output
    assert f"is signed by another key ({forged.fingerprint}) than this site's" in output


def test_a_kit_key_pins_the_head_even_if_the_state_is_rewritten(tmp_path: Path) -> None:
    from server.provision import provision

    kits = tmp_path / "kits"
    provision(kits, project="p", server_hosts=["127.0.0.1"], sites=[SITE])
    kit = kits / "sites" / SITE
    state = tmp_path / "state"
    _send(state, key_path=kit / "site.key")
    assert not (state / KEY).exists()  # the kit's key signs; none is made in the state
    code, output = _verify(state, "--kit", str(kit))
    assert code == 0, output
    # the state folder is not named after the site: the kit (or --site) names it in a witness
    witness = _witness(tmp_path, [ChainHead.from_json(json.loads((state / HEAD).read_text()),
                                                      where="head")])
    assert _verify(state, "--kit", str(kit), "--witness", str(witness))[0] == 0
    assert _verify(state, "--site", SITE, "--witness", str(witness))[0] == 0
    code, output = _verify(state, "--witness", str(witness))
    assert code == 2 and "records no audit head of site 'state'" in output, output
    assert ChainHead.from_json(json.loads((state / HEAD).read_text()), where="h").same_key(
        (kit / "site.pub").read_text()
    )
    # an attacker who rewrites the trail, the head and the pin with a key of their own
    lines = _lines(state)[:-1]
    (state / TRAIL).write_text("\n".join(lines) + "\n")
    other, _ = new_signing_key()
    forged = ChainHead.sign(other, seq=2, hash_hex=json.loads(lines[-1])["hash"])
    (state / HEAD).write_text(json.dumps(forged.to_json()))
    (state / PIN).write_text(forged.public_key + "\n")
    code, output = _verify(state, "--kit", str(kit))
    assert code == 1 and "than this site's (the kit's site.pub)" in output, output


def test_a_resigned_rewrite_fails_against_the_aggregators_witness(
    state: Path, tmp_path: Path
) -> None:
    original = json.loads((state / HEAD).read_text())
    witness = _witness(tmp_path, [ChainHead.from_json(original, where="head")])
    assert _verify(state, "--witness", str(witness))[0] == 0
    # whoever holds the state folder (and so a simulated site's own key) re-signs a rewrite
    entries = [json.loads(line) for line in _lines(state)]
    entries[3]["metrics"]["auc"] = 0.99
    _rechain(state, entries)
    last = json.loads(_lines(state)[-1])
    resigned = ChainHead.sign(load_signing_key(state / KEY), seq=3, hash_hex=last["hash"])
    (state / HEAD).write_text(json.dumps(resigned.to_json()))
    assert _verify(state)[0] == 0  # consistent in itself: the key was in the folder
    code, output = _verify(state, "--witness", str(witness))
    assert code == 1, output
    assert "round 1: entry 3 is not the one the aggregator witnessed" in output


def test_a_witnessed_head_past_the_end_of_the_trail_fails(state: Path, tmp_path: Path) -> None:
    head = ChainHead.from_json(json.loads((state / HEAD).read_text()), where="head")
    witness = _witness(tmp_path, [head])
    lines = _lines(state)[:-1]
    (state / TRAIL).write_text("\n".join(lines) + "\n")
    resigned = ChainHead.sign(load_signing_key(state / KEY), seq=2,
                              hash_hex=json.loads(lines[-1])["hash"])
    (state / HEAD).write_text(json.dumps(resigned.to_json()))
    code, output = _verify(state, "--witness", str(witness))
    assert code == 1 and "witnessed entry 3, but the trail ends at entry 2" in output, output


def test_a_witness_signed_by_another_key_fails(state: Path, tmp_path: Path) -> None:
    head = ChainHead.from_json(json.loads((state / HEAD).read_text()), where="head")
    other, _ = new_signing_key()
    witness = _witness(tmp_path, [ChainHead.sign(other, seq=head.seq, hash_hex=head.hash)])
    code, output = _verify(state, "--witness", str(witness))
    assert code == 1 and "the trail was re-signed" in output, output


def test_a_witness_without_the_site_is_bad_input(state: Path, tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"rounds": [{"round": 1, "audit_heads": {}}]}))
    code, output = _verify(state, "--witness", str(path))
    assert code == 2 and "records no audit head of site 'site-a'" in output, output
    path.write_text("not json")
    code, output = _verify(state, "--witness", str(path))
    assert code == 2 and "not a run's results.json" in output, output


def test_a_misspelled_state_folder_is_bad_input(state: Path, tmp_path: Path) -> None:
    code, output = _verify(state.parent / "site-b")
    assert code == 2 and "no such folder" in output, output
    elsewhere = tmp_path / "data"
    elsewhere.mkdir()
    (elsewhere / "labels.csv").write_text("path,label\n")
    code, output = _verify(elsewhere)
    assert code == 2 and "not a site's state folder" in output, output


def test_a_site_state_with_nothing_sent_passes_only_when_nothing_was_sent(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    (fresh / "approval-bin").mkdir(parents=True)  # what `medfed site` writes when it starts
    code, output = _verify(fresh)
    assert code == 0 and "no replies sent yet" in output, output
    (fresh / "progress.jsonl").write_text(json.dumps({"run": "r", "round": 1}) + "\n")
    code, output = _verify(fresh)
    assert code == 1 and "records 1 trainings or evaluations" in output, output


def test_each_reply_head_names_the_entry_that_describes_that_reply(tmp_path: Path) -> None:
    """The aggregator's record of a reply's head is the entry with that reply's digest."""
    state = tmp_path / SITE
    reply = train_reply(SITE)
    entry = describe_reply(reply, run="r", round=1, message_type="train")
    head = append_signed(state, entry, key=signing_key(state, None))
    reply[HEAD_RECORD] = head.to_record()
    log = RoundLog(round=1)
    log.witness(SITE, reply.config_records.get(HEAD_RECORD))
    recorded = log.audit_heads[SITE]
    assert recorded == head.to_json()
    line = json.loads(_lines(state)[recorded["seq"]])
    assert line["hash"] == recorded["hash"]
    assert line["payload_sha256"] == entry["payload_sha256"]
    assert ChainHead.from_json(recorded, where="results.json").signature_ok()


def test_a_legacy_replys_metrics_carry_the_same_head(tmp_path: Path) -> None:
    """SecAgg+ replies keep only their metrics: the head travels there, prefixed."""
    from common.audit_head import head_in_metrics, head_metrics

    state = tmp_path / SITE
    entry = describe_reply(evaluate_reply(SITE), run="r", round=1, message_type="evaluate")
    head = append_signed(state, entry, key=signing_key(state, None))
    metrics = {"auc": 0.8, "site-name": SITE, **head_metrics(head.to_record())}
    assert sorted(k for k in metrics if k.startswith("audit-head-")) == [
        "audit-head-hash", "audit-head-key", "audit-head-seq", "audit-head-signature"
    ]
    log = RoundLog(round=1)
    log.witness(SITE, head_in_metrics(metrics))
    assert log.audit_heads[SITE] == head.to_json()
    assert head_in_metrics({"auc": 0.8}) is None
