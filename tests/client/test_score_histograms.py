"""A site's validation-score histograms: guarded by name, and under DP released once, accounted."""

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from opacus.accountants import RDPAccountant

from client.app import make_client_app
from client.audit import OutboundViolation
from client.ledger import PrivacyLedger
from client.outbound import GUARD
from common.config import RunConfig
from common.flower_compat.task_identity import identity
from common.operating import BINS, HIST_KEYS, RELEASE
from common.sites import SiteRef
from common.training.tasks import get_task
from models import build_model
from tests.simulations.conftest import write_easy_site


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with identity(task_id=1, run_id=1, node_id=1):
        yield


def test_the_guard_lets_only_the_histogram_keys_be_lists() -> None:
    counts = [1.0] * BINS
    GUARD.check(RecordDict({"metrics": MetricRecord({HIST_KEYS[0]: counts, "auc": 0.8})}))
    for key, value in (("auc", [0.1, 0.9, 0.4]), ("score-hist-2", counts),
                       ("per-image-scores", counts)):
        with pytest.raises(OutboundViolation, match=key):
            GUARD.check(RecordDict({"metrics": MetricRecord({key: value})}))


def _message(kind: str, cfg: RunConfig, server_round: int, state, **extra) -> Message:
    config = ConfigRecord({**cfg.to_mapping(), "server-round": server_round, **extra})
    return Message(RecordDict({"arrays": ArrayRecord(state), "config": config}), dst_node_id=1,
                   message_type=MessageType.TRAIN if kind == "train" else MessageType.EVALUATE)


def _run_site(tmp_path: Path, *, dp: bool) -> tuple[list[MetricRecord], SiteRef, RunConfig]:
    """Two rounds of train + evaluate at one real site; each evaluate reply's metrics."""
    data = tmp_path / "data"
    write_easy_site(data, 30, 0.5, np.random.default_rng(0))
    site = SiteRef("site-a", data, tmp_path / "state")
    cfg = RunConfig(rounds=2, dp=dp, image_size=32, local_steps=2, batch_size=8,
                    ledger_dir=str(tmp_path / "ledger"), run_key="run-1", seed=0)
    app = make_client_app([site])
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    state = build_model(cfg.model, in_channels=1, num_classes=2, image_size=32).state_dict()
    replies = []
    for server_round in (1, 2):
        trained = app(_message("train", cfg, server_round, state), context)
        assert not trained.has_error(), trained.error
        state = trained.content.array_records["arrays"].to_torch_state_dict()
        evaluated = app(_message("evaluate", cfg, server_round, state, threshold=0.3), context)
        assert not evaluated.has_error(), evaluated.error
        replies.append(evaluated.content.metric_records["metrics"])
    return replies, site, cfg


def test_without_dp_every_round_sends_the_exact_counts(tmp_path: Path) -> None:
    replies, site, cfg = _run_site(tmp_path, dp=False)
    # the site's own rates are at the threshold the aggregator sent (0 calls everyone positive)
    app = make_client_app([site])
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    state = build_model(cfg.model, in_channels=1, num_classes=2, image_size=32).state_dict()
    everyone = app(_message("evaluate", cfg, 1, state, threshold=0.0), context)
    metrics = everyone.content.metric_records["metrics"]
    assert metrics["sensitivity"] == 1.0 and metrics["specificity"] == 0.0
    n_val = sum(1 for line in (site.data_dir / "labels.csv").read_text().splitlines()
                if line.endswith(",val"))
    for metrics in replies:
        counts = np.array([metrics[key] for key in HIST_KEYS])
        assert counts.shape == (2, BINS)
        assert (counts == np.round(counts)).all() and counts.sum() == n_val
        assert metrics["num-examples"] == n_val


def test_with_dp_the_final_round_releases_noisy_counts_once_and_accounts_them(
    tmp_path: Path,
) -> None:
    replies, site, cfg = _run_site(tmp_path, dp=True)
    assert not any(key in replies[0] for key in HIST_KEYS)  # not before the final round
    noisy = np.array([replies[1][key] for key in HIST_KEYS])
    assert noisy.shape == (2, BINS) and (noisy != np.round(noisy)).any()

    # training: exactly Opacus's accountant over (noise, rate, steps); the releases are not in it
    trained = json.loads((site.state_dir / "privacy" / "run-1.json").read_text())
    assert {step[1] for step in trained["history"]} == {trained["sample_rate"]}
    accountant = RDPAccountant()
    accountant.history = [(trained["noise_multiplier"], trained["sample_rate"],
                           sum(step[2] for step in trained["history"]))]
    train_epsilon = accountant.get_epsilon(delta=trained["delta"])
    assert train_epsilon <= cfg.target_epsilon + 1e-9
    # validation: its own state, both releases (class counts, scores) once each
    saved = json.loads((site.state_dir / "privacy" / "run-1.validation.json").read_text())
    assert RELEASE in saved["released"]
    np.testing.assert_allclose(np.ravel(noisy), saved["released"][RELEASE])
    history = [tuple(step) for step in saved["history"]]
    assert (get_task("classify").releases(cfg)[RELEASE], 1.0, 1) in history
    assert len(history) == len(get_task("classify").releases(cfg))
    accountant = RDPAccountant()
    accountant.history = list(history)
    val_epsilon = accountant.get_epsilon(delta=saved["delta"])
    assert val_epsilon <= cfg.target_epsilon + 1e-9
    # each split's images carry their own spend in the site's cross-run ledger
    for split, epsilon in (("train", train_epsilon), ("val", val_epsilon)):
        ledger = PrivacyLedger(site.data_dir, Path(cfg.ledger_dir), split=split, seed=cfg.seed)
        assert ledger.read().spent() == pytest.approx(epsilon, rel=1e-6)
