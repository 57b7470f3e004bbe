"""A failing site: in simulation its reason and site.log reach the user; deployed, only the kind."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from client.outbound import SITE_LOG, SiteFailure, _outbound_mod
from common.config import RunConfig
from common.flower_compat.task_identity import identity
from common.sites import SiteRef


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    # a Message is created inside a task (Flower sets who sends it); here, a test's own
    with identity(task_id=1, run_id=1, node_id=1):
        yield


def _message() -> Message:
    config = ConfigRecord({**RunConfig().to_mapping(), "server-round": 2})
    return Message(RecordDict({"config": config}), dst_node_id=1,
                   message_type=MessageType.TRAIN)


def _fail(msg: Message, context: Context) -> Message:
    raise ValueError("label 7 found but the run has --num-classes 2")


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})


def test_a_simulated_site_sends_its_reason_and_keeps_a_log(tmp_path: Path) -> None:
    site = SiteRef("site-a", tmp_path / "data", tmp_path / "state" / "site-a")
    mod = _outbound_mod([site])
    with pytest.raises(SiteFailure) as err:
        mod(_message(), _context({"partition-id": 0}), _fail)
    text = str(err.value)
    assert text.startswith("site site-a: train failed (ValueError: label 7 found")
    assert str(site.state_dir / SITE_LOG) in text
    log = (site.state_dir / SITE_LOG).read_text()
    assert "round 2: train failed at site-a" in log and "Traceback" in log


def test_a_deployed_site_sends_only_the_kind(tmp_path: Path) -> None:
    node = {"data-path": str(tmp_path / "data"), "site-name": "site-b",
            "state-dir": str(tmp_path / "state")}
    mod = _outbound_mod(None)
    with pytest.raises(SiteFailure) as err:
        mod(_message(), _context(node), _fail)
    assert str(err.value) == (
        "site site-b: train failed (ValueError); the details stay in the site's own log"
    )
    assert not (tmp_path / "state" / SITE_LOG).exists()


def test_a_spent_run_target_is_a_refusal_not_an_error(tmp_path: Path) -> None:
    """A resumed run whose sites spent the run's target epsilon: policy (exit 3), as a budget."""
    from client.ledger import BudgetRefused
    from common.privacy import PrivacyBudgetSpent, parse_refusal

    def spent(msg: Message, context: Context) -> Message:
        raise PrivacyBudgetSpent("has spent epsilon 8.000 of the run's target 8; ...")

    site = SiteRef("site-a", tmp_path / "data", tmp_path / "state" / "site-a")
    with pytest.raises(BudgetRefused) as err:
        _outbound_mod([site])(_message(), _context({"partition-id": 0}), spent)
    assert parse_refusal(f"<wrapped '{err.value}'>") == (str(err.value), "site-a")
