"""The site's privacy ledger: exact composition across runs, refusal at the budget, persistence."""

from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from client.ledger import BudgetRefused, PrivacyLedger
from common.privacy import REFUSAL_MARK

RUN_1 = [(1.1, 0.05, 100), (1.1, 0.05, 100)]
RUN_2 = [(0.9, 0.1, 50)]


def test_epsilon_is_one_rdp_accountant_over_every_step_of_every_run(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "site", tmp_path / "ledger")
    ledger.commit(run="r1", history=RUN_1, budget=None)
    spent = ledger.commit(run="r2", history=RUN_2, budget=None)
    accountant = RDPAccountant()
    for sigma, q, steps in [*RUN_1, *RUN_2]:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert spent == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    # more than either run alone, less than the sum of the two (RDP composes tighter)
    alone = [PrivacyLedger(tmp_path / "x" / r, tmp_path / "l2") for r in ("a", "b")]
    e1 = alone[0].commit(run="r1", history=RUN_1, budget=None)
    e2 = alone[1].commit(run="r2", history=RUN_2, budget=None)
    assert max(e1, e2) < spent < e1 + e2


def test_a_round_past_the_budget_is_refused_and_nothing_is_recorded(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "site", tmp_path / "ledger")
    ledger.commit(run="r1", history=RUN_1, budget=5.0)
    before = ledger.read().spent()
    big_round = [(0.5, 0.5, 200)]
    with pytest.raises(BudgetRefused, match=REFUSAL_MARK) as refused:
        ledger.check_round(run="r2", history_after=big_round, budget=5.0, site="hospital-a")
    assert "hospital-a" in str(refused.value) and f"{before:.3f}" in str(refused.value)
    assert ledger.read().spent() == before
    assert set(ledger.read().runs) == {"r1"}
    # a cheap round fits, and its epsilon is what the ledger then reports once committed
    after = ledger.check_round(run="r2", history_after=[(5.0, 0.01, 1)], budget=5.0, site="a")
    assert after == pytest.approx(ledger.commit(run="r2", history=[(5.0, 0.01, 1)], budget=5.0))


def test_the_ledger_survives_restarts_and_never_forgets(tmp_path: Path) -> None:
    PrivacyLedger(tmp_path / "site", tmp_path / "ledger").commit(run="r1", history=RUN_1,
                                                                 budget=3.0)
    reopened = PrivacyLedger(tmp_path / "site", tmp_path / "ledger").read()
    assert reopened.runs["r1"] == RUN_1 and reopened.budget_epsilon == 3.0
    with pytest.raises(ValueError, match="shrank"):
        PrivacyLedger(tmp_path / "site", tmp_path / "ledger").commit(
            run="r1", history=RUN_1[:1], budget=3.0
        )
    # another dataset has a ledger of its own
    assert PrivacyLedger(tmp_path / "other", tmp_path / "ledger").read().spent() == 0.0


def test_virtual_sites_of_one_pooled_folder_keep_separate_ledgers(tmp_path: Path) -> None:
    pool, ledgers = tmp_path / "pool", tmp_path / "ledger"
    PrivacyLedger(pool, ledgers, subset="site-0001").commit(run="r1", history=RUN_1, budget=None)
    assert PrivacyLedger(pool, ledgers, subset="site-0002").read().spent() == 0.0
    assert PrivacyLedger(pool, ledgers).read().spent() == 0.0
    assert PrivacyLedger(pool, ledgers, subset="site-0001").read().spent() > 0
