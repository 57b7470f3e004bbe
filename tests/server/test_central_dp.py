from typing import cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from opacus.accountants import RDPAccountant

from common.config import ConfigError, RunConfig
from common.privacy import UNIT_WEIGHT
from server.central_dp import CentralPrivacy, central_noise_multiplier, sampled_sites
from server.strategies import build_strategy

Arrays = dict[str, np.ndarray]


class _Nodes:
    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _global() -> Arrays:
    return {"w": np.zeros((8, 4), np.float32), "b": np.zeros(4, np.float32)}


def _update(seed: int, norm: float) -> Arrays:
    """An update (global is zero) with the given L2 norm over all arrays."""
    rng = np.random.default_rng(seed)
    parts = {k: rng.normal(size=v.shape) for k, v in _global().items()}
    total = np.sqrt(sum(float((p**2).sum()) for p in parts.values()))
    return {k: (p * norm / total).astype(np.float32) for k, p in parts.items()}


def _round(
    wrapper: CentralPrivacy, updates: list[Arrays | None], server_round: int = 1
) -> ArrayRecord | None:
    sent = sorted(
        wrapper.configure_train(
            server_round, _record(_global()), ConfigRecord(), cast(Grid, _Nodes(len(updates)))
        ),
        key=lambda m: m.metadata.dst_node_id,
    )
    replies = []
    for i, (request, update) in enumerate(zip(sent, updates, strict=True)):
        if update is None:
            replies.append(Message(Error(code=0, reason="site dropped"), reply_to=request))
            continue
        content = RecordDict({
            "arrays": _record(update),
            "metrics": MetricRecord({"num-examples": 10 * (i + 1), UNIT_WEIGHT: 1}),
            "site": ConfigRecord({"name": f"h{i}"}),
        })
        replies.append(Message(content, reply_to=request))
    arrays, _ = wrapper.aggregate_train(server_round, replies)
    return arrays


def _cfg(**kw: object) -> RunConfig:
    base: dict[str, object] = {"dp": False, "central_dp": "server-fixed", "min_sites": 4,
                               "rounds": 3, "clip_norm": 1.0}
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


def test_calibrated_noise_spends_the_target_over_the_rounds() -> None:
    cfg = _cfg(target_epsilon=4.0, rounds=10)
    sigma = central_noise_multiplier(cfg)
    acc = RDPAccountant()
    acc.history = [(sigma, 1.0, 10)]
    assert acc.get_epsilon(delta=cfg.delta) == pytest.approx(4.0, rel=0.02)
    assert central_noise_multiplier(cfg.replace(central_noise=0.7)) == 0.7


def test_sites_per_round_follows_fedavg_sampling() -> None:
    assert sampled_sites(_cfg(fraction_train=0.5, min_sites=2), 10) == 5
    assert sampled_sites(_cfg(fraction_train=0.1, min_sites=2), 10) == 2
    assert sampled_sites(_cfg(min_sites=3), None) == 3  # deployed: the minimum


def test_server_clipping_bounds_each_site_and_noise_is_accounted() -> None:
    cfg = _cfg(central_noise=1e-6)  # noise small enough to check the clipped mean exactly
    wrapper = CentralPrivacy(build_strategy(cfg, num_sites=4), cfg, num_sites=4)
    updates = [_update(1, 0.5), _update(2, 0.8), _update(3, 50.0), _update(4, 3.0)]
    arrays = _round(wrapper, list(updates))
    assert arrays is not None
    clipped = [
        {k: v * min(1.0, 1.0 / float(np.sqrt(sum((a**2).sum() for a in u.values()))))
         for k, v in u.items()}
        for u in updates
    ]
    for key in ("w", "b"):
        expected = np.mean([c[key] for c in clipped], axis=0)  # unweighted: every site counts 1
        np.testing.assert_allclose(arrays[key].numpy(), expected, atol=1e-4)
    assert wrapper.ledger.history == [(pytest.approx(1e-6), 1.0, 1)]


def test_a_dropped_site_still_aggregates_and_is_accounted_at_the_noise_it_got() -> None:
    cfg = _cfg(central_noise=2.0)
    wrapper = CentralPrivacy(build_strategy(cfg, num_sites=4), cfg, num_sites=4)
    arrays = _round(wrapper, [_update(1, 0.5), None, _update(3, 0.5), _update(4, 0.5)])
    assert arrays is not None  # Flower's wrapper alone would skip the round on the error
    # noise std 2 * C / 4 on a mean over 3 updates (sensitivity C / 3): sigma 2 * 3 / 4
    assert wrapper.ledger.history == [(pytest.approx(1.5), 1.0, 1)]
    _round(wrapper, [_update(5, 0.5)] * 4, server_round=2)
    acc = RDPAccountant()
    acc.history = [(1.5, 1.0, 1), (2.0, 1.0, 1)]
    assert wrapper.ledger.epsilon() == pytest.approx(acc.get_epsilon(delta=cfg.delta))
    summary = wrapper.ledger.summary()
    assert summary["releases"] == 2 and summary["level"] == "site"


def test_noise_is_really_added() -> None:
    # Flower draws the noise from numpy's global generator: seeded, the test does not depend on
    # which tests ran before it; 20 rounds of 36 values estimate the std within a few percent
    np.random.seed(1)
    cfg = _cfg(central_noise=1.0, rounds=20)
    wrapper = CentralPrivacy(build_strategy(cfg, num_sites=4), cfg, num_sites=4)
    noise = []
    for server_round in range(1, 21):
        # updates of norm 1e-6: what the mean holds is the noise
        arrays = _round(wrapper, [_update(i, 1e-6) for i in range(4)], server_round=server_round)
        assert arrays is not None
        noise += [arrays[k].numpy().ravel() for k in ("w", "b")]
    assert np.concatenate(noise).std() == pytest.approx(1.0 * 1.0 / 4, rel=0.15)


def test_adaptive_clipping_moves_the_norm_and_accounts_both_queries() -> None:
    np.random.seed(0)  # Flower draws the count's noise from numpy's global generator
    cfg = _cfg(central_dp="server-adaptive", central_noise=0.5, clip_norm=0.1)
    wrapper = CentralPrivacy(build_strategy(cfg, num_sites=4), cfg, num_sites=4)
    _round(wrapper, [_update(i, 5.0) for i in range(4)])
    # every update clipped: the norm grows (Flower's own update would shrink it)
    assert wrapper.ledger.clipping_norm > 0.1
    for server_round in range(2, 40):
        _round(wrapper, [_update(i, 0.01) for i in range(4)], server_round=server_round)
    assert wrapper.ledger.clipping_norm < 0.1  # none clipped: it comes down towards them
    # all four updates aggregated: the two noised queries compose back to sigma
    assert wrapper.ledger.history[0][0] == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"central_dp": "server-fixed", "strategy": "krum"}, "--strategy"),
        ({"secure_agg": True, "central_dp": "server-fixed"}, "--central-dp"),
        ({"secure_agg": True, "screen_z": 3.5}, "--screen-z"),
        ({"central_dp": "local"}, "--central-dp"),
        ({"clip_norm": 0.0}, "--clip-norm"),
        ({"secagg_shares": 2.0}, "--secagg-shares"),
        ({"secagg_shares": 4.0, "secagg_threshold": 4.0}, "--secagg-threshold"),
    ],
)
def test_invalid_privacy_settings_name_their_flag(changes: dict[str, object], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        RunConfig(**changes)  # type: ignore[arg-type]
