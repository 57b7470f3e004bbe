import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)

from common.config import RunConfig
from common.flower_compat.strategy_state import restore_strategy_state, strategy_state
from server.federation import RecordingStrategy
from server.strategies import build_strategy, nan_safe_weighted_mean


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam), ("fedyogi", FedYogi),
        ("fedmedian", FedMedian), ("fedtrimmedavg", FedTrimmedAvg), ("krum", Krum),
    ],
)
def test_strategy_by_name(name: str, cls: type) -> None:
    strategy = build_strategy(RunConfig(strategy=name, min_sites=3), num_sites=5)
    assert type(strategy) is cls
    assert strategy.min_available_nodes == 3


def test_fedprox_gets_mu_and_fedadam_gets_server_lr() -> None:
    prox = build_strategy(RunConfig(strategy="fedprox", proximal_mu=0.3))
    assert isinstance(prox, FedProx) and prox.proximal_mu == 0.3
    adam = build_strategy(RunConfig(strategy="fedadam", server_lr=0.02, lr=0.1))
    assert isinstance(adam, FedAdam) and (adam.eta, adam.eta_l) == (0.02, 0.1)


def test_min_sites_capped_by_federation_size() -> None:
    assert build_strategy(RunConfig(min_sites=5), num_sites=3).min_train_nodes == 3


def _request(node: int, kind: str = "train") -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type=kind)


def _reply(request: Message, site: str, weights: np.ndarray, n: int, auc: float) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": torch.from_numpy(weights)}),
            "metrics": MetricRecord({"num-examples": n, "auc": auc}),
            "site": ConfigRecord({"name": site}),
            "privacy": ConfigRecord({"epsilon": 1.5, "steps": 7}),
        }
    )
    return Message(content, reply_to=request)


def test_fedavg_aggregation_is_the_weighted_average() -> None:
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]
    sizes = [10, 30, 60]
    requests = [_request(i + 1) for i in range(3)]
    replies = [
        _reply(q, f"h{i}", w, n, 0.5 + i / 10)
        for i, (q, w, n) in enumerate(zip(requests, weights, sizes, strict=True))
    ]
    wrapper = RecordingStrategy(build_strategy(RunConfig()))
    wrapper._sent_train = requests
    arrays, metrics = wrapper.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(
        arrays["w"].numpy(), np.average(np.stack(weights), axis=0, weights=sizes), rtol=1e-5
    )
    assert metrics["auc"] == pytest.approx(np.average([0.5, 0.6, 0.7], weights=sizes))
    log = wrapper.rounds[1]
    assert log.participants == ["h0", "h1", "h2"]
    assert log.privacy["h1"]["epsilon"] == 1.5


def test_failures_and_missing_replies_are_recorded_with_the_round_offset() -> None:
    requests = [_request(1), _request(2), _request(3)]
    ok = _reply(requests[0], "h0", np.ones((2,), np.float32), 5, 0.9)
    failed = Message(Error(code=0, reason="site crashed"), reply_to=requests[1])
    wrapper = RecordingStrategy(build_strategy(RunConfig()), round_offset=4)
    wrapper._sent_train = requests
    wrapper.aggregate_train(1, [ok, failed])
    log = wrapper.rounds[5]  # round 1 after resuming at round 4
    reasons = sorted(f["reason"] for f in log.failures)
    assert reasons == ["no reply before the round timeout", "site crashed"]


def test_nan_metrics_do_not_poison_the_average() -> None:
    records = [
        RecordDict({"m": MetricRecord({"num-examples": 10, "auc": math.nan, "loss": 1.0})}),
        RecordDict({"m": MetricRecord({"num-examples": 30, "auc": 0.8, "loss": 3.0})}),
    ]
    out = nan_safe_weighted_mean(records, "num-examples")
    assert out["auc"] == pytest.approx(0.8)
    assert out["loss"] == pytest.approx(2.5)
    assert out["num-examples"] == 40


def test_fedadam_state_round_trips() -> None:
    strategy = build_strategy(RunConfig(strategy="fedadam"))
    strategy.m_t = {"w": np.ones(3)}
    strategy.v_t = {"w": np.full(3, 2.0)}
    saved = strategy_state(strategy)
    assert set(saved) == {"m_t/w", "v_t/w"}
    fresh = build_strategy(RunConfig(strategy="fedadam"))
    restore_strategy_state(fresh, saved)
    np.testing.assert_array_equal(fresh.v_t["w"], np.full(3, 2.0))
    with pytest.raises(ValueError, match="resume with the strategy"):
        restore_strategy_state(build_strategy(RunConfig()), saved)


def test_model_bytes_each_way_are_counted_per_site() -> None:
    weights = np.zeros((8, 16), np.float32)  # 512 bytes of weights
    down = RecordDict({"arrays": ArrayRecord({"w": torch.from_numpy(weights)})})
    requests = [Message(down, dst_node_id=node, message_type="train") for node in (1, 2)]
    replies = [
        _reply(requests[0], "h0", weights, 5, 0.9),
        Message(Error(code=0, reason="site crashed"), reply_to=requests[1]),
    ]
    wrapper = RecordingStrategy(build_strategy(RunConfig()))
    wrapper._sent_train = requests
    wrapper.aggregate_train(1, replies)
    counted = wrapper.rounds[1].update_bytes
    # the serialised array is its 512 bytes of data and a small numpy header
    assert 512 < counted["h0"]["down"] < 512 + 256
    assert counted["h0"]["up"] == counted["h0"]["down"]
    # a site that failed was still sent the model, and sent nothing back
    assert counted["node-2"] == {"down": counted["h0"]["down"], "up": 0}
    assert [f["kind"] for f in wrapper.rounds[1].failures] == ["error"]
