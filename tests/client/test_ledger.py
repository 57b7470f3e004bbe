"""The site's privacy ledger: exact composition, refusal at the budget, images keyed by content,
one lock for check and spend, no-DP as unbounded, and a damaged file that stops training."""

import json
import math
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from typer.testing import CliRunner

from client.ledger import BudgetRefused, LedgerError, PrivacyLedger
from common.privacy import REFUSAL_MARK, epsilon_of
from medfed.cli import app
from tests.simulations.conftest import write_easy_site

RUN_1 = [(1.1, 0.05, 100), (1.1, 0.05, 100)]
RUN_2 = [(0.9, 0.1, 50)]
ROUND = (1.0, 0.1, 20)  # one round's (noise, sample rate, steps)


def _site(root: Path, n: int = 10, seed: int = 0) -> Path:
    """A real site folder: n 32x32 DICOM images and labels.csv (6 of each 10 in train)."""
    write_easy_site(root, n, 0.5, np.random.default_rng(seed))
    return root


def _train(data: Path, ledgers: Path, **kw) -> PrivacyLedger:
    return PrivacyLedger(data, ledgers, split="train", **kw)


def _spend(ledger: PrivacyLedger, run: str, history, budget=None, site="a") -> float:
    """A run that trained `history` (its last step the round just reserved)."""
    *before, last = history
    ledger.reserve_round(run=run, site=site, history=before, this_round=last, budget=budget)
    return ledger.commit(run=run, site=site, history=history)


def test_epsilon_is_one_rdp_accountant_over_every_step_of_every_run(tmp_path: Path) -> None:
    site, ledgers = _site(tmp_path / "site"), tmp_path / "ledger"
    _spend(_train(site, ledgers), "r1", RUN_1)
    spent = _spend(_train(site, ledgers), "r2", RUN_2)
    accountant = RDPAccountant()
    for sigma, q, steps in [*RUN_1, *RUN_2]:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert spent == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    assert PrivacyLedger(site, ledgers).read().spent() == pytest.approx(spent)
    # more than either run alone, less than the sum of the two (RDP composes tighter)
    e1 = _spend(_train(_site(tmp_path / "x", seed=1), tmp_path / "l2"), "r1", RUN_1)
    e2 = _spend(_train(_site(tmp_path / "y", seed=2), tmp_path / "l2"), "r2", RUN_2)
    assert max(e1, e2) < spent < e1 + e2


def test_a_round_past_the_budget_is_refused_and_nothing_is_recorded(tmp_path: Path) -> None:
    site, ledgers = _site(tmp_path / "site"), tmp_path / "ledger"
    ledger = _train(site, ledgers)
    _spend(ledger, "r1", RUN_1, budget=5.0)
    before = ledger.read().spent()
    with pytest.raises(BudgetRefused, match=REFUSAL_MARK) as refused:
        ledger.reserve_round(run="r2", site="hospital-a", history=[], this_round=(0.5, 0.5, 200),
                             budget=5.0)
    assert "hospital-a" in str(refused.value) and f"{before:.3f}" in str(refused.value)
    assert ledger.read().spent() == before
    assert set(ledger.read().runs) == {"r1@a"}
    assert ledger.read().budget_epsilon == 5.0
    # a cheap round fits, and is on the books before it trains
    after = ledger.reserve_round(run="r2", site="a", history=[], this_round=(5.0, 0.01, 1),
                                 budget=5.0)
    assert ledger.read().spent() == pytest.approx(after)


def test_a_reserved_round_stays_counted_when_training_fails(tmp_path: Path) -> None:
    site, ledgers = _site(tmp_path / "site"), tmp_path / "ledger"
    ledger = _train(site, ledgers)
    ledger.reserve_round(run="r1", site="a", history=[], this_round=ROUND, budget=None)
    # training failed: no commit; the next round's privacy state still has an empty history
    ledger.reserve_round(run="r1", site="a", history=[], this_round=ROUND, budget=None)
    two_rounds = epsilon_of([ROUND, ROUND], delta=1e-5, accountant="rdp")
    assert ledger.read().spent() == pytest.approx(two_rounds)
    # a commit of less than was reserved never lowers it
    ledger.commit(run="r1", site="a", history=[ROUND])
    assert ledger.read().spent() == pytest.approx(two_rounds)


def test_the_ledger_survives_restarts(tmp_path: Path) -> None:
    site, ledgers = _site(tmp_path / "site"), tmp_path / "ledger"
    _spend(_train(site, ledgers), "r1", RUN_1, budget=30.0)
    reopened = PrivacyLedger(site, ledgers).read()
    assert reopened.runs["r1@a"] == RUN_1 and reopened.budget_epsilon == 30.0
    # another dataset has its own spend
    assert PrivacyLedger(_site(tmp_path / "other", seed=5), ledgers).read().spent() == 0.0


def test_virtual_sites_of_one_pooled_folder_keep_separate_ledgers(tmp_path: Path) -> None:
    pool, ledgers = _site(tmp_path / "pool"), tmp_path / "ledger"
    _spend(_train(pool, ledgers, subset="site-0001"), "r1", RUN_1)
    assert _train(pool, ledgers, subset="site-0002").read().spent() == 0.0
    assert PrivacyLedger(pool, ledgers).read().spent() == 0.0
    assert _train(pool, ledgers, subset="site-0001").read().spent() > 0


@pytest.mark.parametrize("how", ["hard link", "copy, renamed", "moved"])
def test_a_copy_of_the_images_shares_their_budget(tmp_path: Path, how: str) -> None:
    site, ledgers = _site(tmp_path / "site"), tmp_path / "ledger"
    spent = _spend(_train(site, ledgers), "r1", RUN_1, budget=13.0)
    other = tmp_path / "elsewhere" / "renamed"
    if how == "hard link":
        shutil.copytree(site, other, copy_function=os.link)
        assert os.stat(other / "img000.dcm").st_ino == os.stat(site / "img000.dcm").st_ino
    elif how == "copy, renamed":
        shutil.copytree(site, other)
    else:
        other.parent.mkdir()
        site.rename(other)
    copy = _train(other, ledgers)
    assert copy.read().spent() == pytest.approx(spent)
    # the copy cannot spend past the budget the original already used
    with pytest.raises(BudgetRefused, match=REFUSAL_MARK):
        copy.reserve_round(run="r2", site="b", history=[], this_round=RUN_1[0],
                           budget=spent + 0.01)


def test_a_partial_copy_shares_the_spend_of_the_images_it_holds(tmp_path: Path) -> None:
    site, ledgers = _site(tmp_path / "site", n=20), tmp_path / "ledger"
    spent = _spend(_train(site, ledgers), "r1", RUN_1)
    part = tmp_path / "part"
    part.mkdir()
    lines = (site / "labels.csv").read_text().splitlines()
    kept = [line for line in lines[1:] if line.endswith("train")][:3]  # 3 trained images
    kept.append("new.dcm,0,train")  # and one the site never trained on
    for line in kept[:3]:
        os.link(site / line.split(",")[0], part / line.split(",")[0])
    _site(tmp_path / "fresh", n=1, seed=9)
    shutil.copy(tmp_path / "fresh" / "img000.dcm", part / "new.dcm")
    (part / "labels.csv").write_text("\n".join([lines[0], *kept]) + "\n")
    # the most-spent image of the part is one of the original's
    assert _train(part, ledgers).read().spent() == pytest.approx(spent)


def test_a_run_without_dp_is_unbounded_spend(tmp_path: Path) -> None:
    site, ledgers = _site(tmp_path / "site"), tmp_path / "ledger"
    _train(site, ledgers).record_unbounded(run="r1", site="a")
    assert math.isinf(PrivacyLedger(site, ledgers).read().spent())
    with pytest.raises(BudgetRefused, match="without DP"):
        _train(site, ledgers).reserve_round(run="r2", site="a", history=[], this_round=ROUND,
                                            budget=100.0)
    shown = CliRunner().invoke(app, ["site", "budget", "--data", str(site), "--ledger-dir",
                                     str(ledgers), "--json"])
    assert shown.exit_code == 0, shown.output
    entry = json.loads(shown.output)
    assert entry["epsilon_spent"] == "inf" and entry["runs"] == {"r1@a": "unbounded (no DP)"}
    text = CliRunner().invoke(app, ["site", "budget", "--data", str(site), "--ledger-dir",
                                    str(ledgers)])
    assert text.exit_code == 0 and "inf (trained without DP)" in text.output


def _damage(path: Path, how: str) -> None:
    good = path.read_text()
    if how == "truncated":
        path.write_text(good[: len(good) // 2])
    elif how == "empty":
        path.write_text("")
    elif how == "wrong types":
        raw = json.loads(good)
        next(iter(raw["spends"].values()))["history"] = "lots"
        path.write_text(json.dumps(raw))
    elif how == "negative steps":
        raw = json.loads(good)
        next(iter(raw["spends"].values()))["history"] = [[1.0, 0.1, -5]]
        path.write_text(json.dumps(raw))
    elif how == "unreadable":
        path.unlink()
        path.mkdir()  # reading it fails (IsADirectoryError), whoever runs the test


@pytest.mark.parametrize("how", ["truncated", "empty", "wrong types", "negative steps",
                                 "unreadable"])
def test_a_damaged_ledger_stops_training_and_names_the_file(tmp_path: Path, how: str) -> None:
    site, ledgers = _site(tmp_path / "site"), tmp_path / "ledger"
    ledger = _train(site, ledgers)
    _spend(ledger, "r1", RUN_1)
    _damage(ledger.path, how)
    for attempt in (
        lambda: ledger.reserve_round(run="r2", site="a", history=[], this_round=ROUND,
                                     budget=50.0),
        lambda: ledger.record_unbounded(run="r2", site="a"),
        lambda: ledger.read().spent(),
    ):
        with pytest.raises(LedgerError, match="restore") as damaged:
            attempt()
        assert str(ledger.path) in str(damaged.value)
    shown = CliRunner().invoke(app, ["site", "budget", "--data", str(site), "--ledger-dir",
                                     str(ledgers)])
    assert shown.exit_code == 2
    assert str(ledger.path) in shown.output.replace("\n", "")
    assert "Expecting value" not in shown.output.split("(")[0]


def test_a_ledger_of_the_previous_version_is_migrated_onto_its_images(tmp_path: Path) -> None:
    import hashlib

    site, ledgers = _site(tmp_path / "site"), tmp_path / "ledger"
    ledgers.mkdir()
    key = str(site.resolve())
    old = ledgers / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    old.write_text(json.dumps({"dataset": key, "budget_epsilon": 9.0, "delta": 1e-5,
                               "runs": {"r1": RUN_1}}))
    copy = tmp_path / "copy"
    shutil.copytree(site, copy)
    expected = epsilon_of(RUN_1, delta=1e-5, accountant="rdp")
    # the copy is opened first: the old file is still charged on the (same) images
    assert PrivacyLedger(copy, ledgers).read().spent() == pytest.approx(expected)
    assert not old.exists() and old.with_name(old.name + ".migrated").exists()
    assert PrivacyLedger(site, ledgers).read().spent() == pytest.approx(expected)
    assert PrivacyLedger(site, ledgers).read().budget_epsilon == 9.0


def test_a_ledger_of_the_previous_version_for_a_missing_folder_is_refused(tmp_path: Path) -> None:
    site, ledgers = _site(tmp_path / "site"), tmp_path / "ledger"
    ledgers.mkdir()
    old = ledgers / "0123456789abcdef.json"
    old.write_text(json.dumps({"dataset": str(tmp_path / "gone"), "runs": {"r1": RUN_1}}))
    with pytest.raises(LedgerError, match="gone") as refused:
        PrivacyLedger(site, ledgers).read()
    assert str(old) in str(refused.value)


def _hammer(data: str, ledgers: str, worker: int, rounds: int, budget: float, start) -> None:
    """One process's rounds on the dataset, all released at once."""
    ledger = PrivacyLedger(Path(data), Path(ledgers), split="train")
    start.wait()
    for i in range(rounds):
        try:
            ledger.reserve_round(run=f"w{worker}-r{i}", site=f"s{worker}", history=[],
                                 this_round=ROUND, budget=budget)
        except BudgetRefused:
            continue


def test_concurrent_processes_never_spend_past_the_budget(tmp_path: Path) -> None:
    site, ledgers = _site(tmp_path / "site"), tmp_path / "ledger"
    linked = tmp_path / "linked"
    shutil.copytree(site, linked, copy_function=os.link)
    per_round = epsilon_of([ROUND], delta=1e-5, accountant="rdp")
    fits = max(k for k in range(1, 60)
               if epsilon_of([ROUND] * k, delta=1e-5, accountant="rdp") <= 3 * per_round + 1e-9)
    budget = epsilon_of([ROUND] * fits, delta=1e-5, accountant="rdp") + 1e-6
    _train(site, ledgers).read()  # the hash cache, so every worker starts at once
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(4)
    workers = [
        ctx.Process(target=_hammer, args=(str(folder), str(ledgers), i, fits, budget, start))
        for i, folder in enumerate([site, linked, site, linked])
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
        assert w.exitcode == 0
    book = PrivacyLedger(site, ledgers).read()
    assert book.spent() <= budget
    assert len(book.runs) == fits  # exactly the rounds that fit trained, across all workers


def test_images_are_hashed_once_per_device_inode_size_and_mtime(tmp_path: Path) -> None:
    from client import content

    site, ledgers = _site(tmp_path / "site"), tmp_path / "ledger"
    first = PrivacyLedger(site, ledgers).keys
    image = site / "img000.dcm"
    stat = image.stat()
    data = bytearray(image.read_bytes())
    data[-1] ^= 0xFF  # same size, same mtime: the cached hash is used, the file is not re-read
    image.write_bytes(bytes(data))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    content._memory.clear()  # a new process: the cache file beside the ledger answers
    assert PrivacyLedger(site, ledgers).keys == first
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # changed: hashed again
    assert PrivacyLedger(site, ledgers).keys != first
