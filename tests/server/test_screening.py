import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server.screening import Rejection, ScreeningStrategy, screening_reason_label

Arrays = dict[str, np.ndarray]


class _Nodes:
    """The one Grid method FedAvg.configure_train needs: which nodes are connected."""

    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _grid(nodes: int) -> Grid:
    return cast(Grid, _Nodes(nodes))


def _record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


class _SpyFedAvg(FedAvg):
    """FedAvg that remembers which replies reached it."""

    seen: list[Message]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.seen = list(replies)
        return super().aggregate_train(server_round, self.seen)


def _global(dtype: type = np.float32) -> Arrays:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(32, 16)).astype(dtype), "b": rng.normal(size=16).astype(dtype)}


def _noisy(base: Arrays, scale: float, seed: int) -> Arrays:
    """An honest-looking update: the global plus Gaussian noise of std `scale`."""
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.normal(size=v.shape)).astype(v.dtype) for k, v in base.items()}


def _scaled(base: Arrays, update: Arrays, factor: float) -> Arrays:
    """`base + factor * (update - base)`: x10 is a boosted update, -5 a flipped one."""
    return {k: (base[k] + factor * (update[k] - base[k])).astype(base[k].dtype) for k in base}


def _screen(
    updates: Sequence[Arrays | None],
    base: Arrays | None = None,
    *,
    inner: FedAvg | None = None,
    **kwargs: Any,
) -> tuple[ScreeningStrategy, list[Message], tuple[ArrayRecord | None, MetricRecord | None]]:
    """Send `base` to len(updates) sites, have site i reply `updates[i]` (None: an error)."""
    base = _global() if base is None else base
    n = len(updates)
    wrapper = ScreeningStrategy(inner or FedAvg(min_train_nodes=n, min_available_nodes=n), **kwargs)
    sent = wrapper.configure_train(1, _record(base), ConfigRecord(), _grid(n))
    requests = sorted(sent, key=lambda m: m.metadata.dst_node_id)
    replies = [_reply(q, i, u) for i, (q, u) in enumerate(zip(requests, updates, strict=True))]
    return wrapper, replies, wrapper.aggregate_train(1, replies)


def _size(i: int) -> int:
    return 10 * (i + 1)


def _reply(request: Message, i: int, update: Arrays | None) -> Message:
    if update is None:
        return Message(Error(code=0, reason="site crashed"), reply_to=request)
    content = RecordDict(
        {
            "arrays": _record(update),
            "metrics": MetricRecord({"num-examples": _size(i), "loss": 1.0}),
            "site": ConfigRecord({"name": f"h{i}"}),
        }
    )
    return Message(content, reply_to=request)


def _assert_average_of(arrays: ArrayRecord | None, updates: dict[int, Arrays]) -> None:
    """`arrays` is the num-examples-weighted average of the updates of the given sites."""
    assert arrays is not None
    sizes = [_size(i) for i in updates]
    for key in ("w", "b"):
        expected = np.average(np.stack([u[key] for u in updates.values()]), axis=0, weights=sizes)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6, atol=1e-6)


def _honest(n: int, base: Arrays, scales: Iterable[float] | None = None) -> list[Arrays]:
    scales = np.linspace(0.01, 0.02, n) if scales is None else scales
    return [_noisy(base, s, seed=100 + i) for i, s in enumerate(scales)]


def _set(base: Arrays, key: str, index: tuple[int, ...], value: float) -> Arrays:
    out = {k: v.copy() for k, v in base.items()}
    out[key][index] = value
    return out


TAMPERED: list[tuple[str, Callable[[Arrays], Arrays], str, str]] = [
    ("nan", lambda u: _set(u, "w", (3, 4), np.nan), "nan", "1 NaN/Inf"),
    ("+inf", lambda u: _set(u, "b", (0,), np.inf), "nan", "1 NaN/Inf"),
    ("-inf", lambda u: _set(u, "w", (0, 0), -np.inf), "nan", "1 NaN/Inf"),
    ("renamed", lambda u: {"w": u["w"], "bias": u["b"]}, "keys", "missing arrays ['b']"),
    ("missing", lambda u: {"w": u["w"]}, "keys", "missing arrays ['b']"),
    ("extra", lambda u: {**u, "x": np.zeros(2, np.float32)}, "keys", "unexpected arrays ['x']"),
    ("transposed", lambda u: {**u, "w": u["w"].T.copy()}, "shape", "shape (16, 32)"),
    ("float64", lambda u: {**u, "b": u["b"].astype(np.float64)}, "dtype", "dtype float64"),
    ("int", lambda u: {**u, "b": u["b"].astype(np.int64)}, "dtype", "dtype int64"),
]


@pytest.mark.parametrize(
    ("case", "tamper", "reason", "detail"), TAMPERED, ids=[t[0] for t in TAMPERED]
)
def test_malformed_update_is_rejected_and_the_rest_averaged(
    case: str, tamper: Callable[[Arrays], Arrays], reason: str, detail: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = _global()
    honest = _honest(4, base)
    with caplog.at_level(logging.WARNING, logger="medfed.server"):
        wrapper, replies, (arrays, _) = _screen([*honest, tamper(honest[0])], base)
    [rejection] = wrapper.rejections[1]
    assert rejection == Rejection(
        replies[4].metadata.src_node_id, "h4", reason, rejection.detail
    )
    assert detail in rejection.detail
    assert f"site h4 ({screening_reason_label(reason)})" in caplog.text
    _assert_average_of(arrays, dict(enumerate(honest)))


def test_scaled_and_flipped_updates_are_rejected_by_norm() -> None:
    base = _global()
    honest = _honest(6, base)
    attackers = [_scaled(base, honest[0], 10.0), _scaled(base, honest[1], -5.0)]
    wrapper, replies, (arrays, _) = _screen([*honest, *attackers], base)
    rejected = {r.site: r for r in wrapper.rejections[1]}
    assert sorted(rejected) == ["h6", "h7"]
    assert all(r.reason == "norm" for r in rejected.values())
    assert "cohort median" in rejected["h6"].detail and "> 3.5)" in rejected["h6"].detail
    _assert_average_of(arrays, dict(enumerate(honest)))
    # Without screening the attackers move the average away from the honest one.
    plain, _ = FedAvg().aggregate_train(1, replies)
    assert plain is not None and arrays is not None
    assert np.abs(plain["w"].numpy() - arrays["w"].numpy()).max() > 1e-2


@pytest.mark.parametrize(
    "scales",
    [
        np.linspace(0.01, 0.02, 6),  # natural variation within 2x
        [0.02, 0.01, 0.015, 0.012, 0.019, 0.011],
        [0.01, 0.01, 0.01, 0.01, 0.01, 0.013],  # tight cohort, one 1.3x site (spread floor)
        [0.01, 0.02, 0.01, 0.02],
        [0.015, 0.012, 0.018, 0.014, 0.016, 0.001],  # a site that barely trained: low side kept
    ],
)
def test_honest_updates_of_natural_variation_are_all_kept(scales: list[float]) -> None:
    base = _global()
    honest = _honest(len(scales), base, scales)
    wrapper, _, (arrays, _) = _screen(list(honest), base)
    assert wrapper.rejections[1] == []
    _assert_average_of(arrays, dict(enumerate(honest)))


@pytest.mark.parametrize(("n_honest", "min_cohort"), [(1, 3), (2, 4), (4, 6)])
def test_norm_check_waits_for_min_cohort(n_honest: int, min_cohort: int) -> None:
    base = _global()
    honest = _honest(n_honest, base)
    updates = [*honest, _scaled(base, honest[0], 10.0)]  # one short of min_cohort
    wrapper, _, (arrays, _) = _screen(updates, base, min_cohort=min_cohort)
    assert wrapper.rejections[1] == []
    _assert_average_of(arrays, dict(enumerate(updates)))


def test_non_finite_norm_is_rejected_even_in_a_small_cohort() -> None:
    base = _global(np.float64)
    honest = _honest(1, base)
    huge = {k: np.full_like(v, 1e200) for k, v in base.items()}  # finite, but its norm overflows
    wrapper, _, (arrays, _) = _screen([*honest, huge], base)
    assert [(r.site, r.reason) for r in wrapper.rejections[1]] == [("h1", "norm")]
    _assert_average_of(arrays, {0: honest[0]})


def test_every_update_rejected_gives_nothing_to_aggregate() -> None:
    base = _global()
    bad = [_set(u, "w", (0, 0), np.nan) for u in _honest(3, base)]
    wrapper, _, result = _screen([*bad, None], base)
    assert result == (None, None)
    assert [r.reason for r in wrapper.rejections[1]] == ["nan"] * 3


def test_error_replies_pass_through_to_the_wrapped_strategy() -> None:
    base = _global()
    honest = _honest(4, base)
    spy = _SpyFedAvg(min_train_nodes=6, min_available_nodes=6)
    wrapper, replies, (arrays, _) = _screen(
        [*honest, None, _scaled(base, honest[0], 10.0)], base, inner=spy
    )
    assert [r.site for r in wrapper.rejections[1]] == ["h5"]
    assert spy.seen == replies[:5]  # the error reply reached FedAvg, the attacker did not
    _assert_average_of(arrays, dict(enumerate(honest)))


def test_site_name_falls_back_to_the_node_id() -> None:
    base = _global()
    wrapper = ScreeningStrategy(FedAvg(min_train_nodes=1, min_available_nodes=1))
    [request] = wrapper.configure_train(1, _record(base), ConfigRecord(), _grid(1))
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(base["w"])}),
            "metrics": MetricRecord({"num-examples": 1}),
        }
    )
    assert wrapper.aggregate_train(1, [Message(content, reply_to=request)]) == (None, None)
    assert wrapper.rejections[1][0].site == str(request.metadata.dst_node_id)


def test_half_the_sites_unchanged_skips_the_norm_check(caplog: pytest.LogCaptureFixture) -> None:
    base = _global()
    updates = [base, base, base, *_honest(2, base)]  # median update norm 0
    with caplog.at_level(logging.WARNING, logger="medfed.server"):
        wrapper, _, _ = _screen(updates, base)
    assert wrapper.rejections[1] == []
    assert "norm screening skipped" in caplog.text


def test_without_a_recorded_global_only_nan_is_checked() -> None:
    base = _global()
    honest = _honest(4, base)
    updates = [*honest, _scaled(base, honest[0], 10.0), _set(honest[1], "w", (0, 0), np.nan)]
    requests = [Message(RecordDict(), dst_node_id=i + 1, message_type="train") for i in range(6)]
    replies = [_reply(q, i, u) for i, (q, u) in enumerate(zip(requests, updates, strict=True))]
    wrapper = ScreeningStrategy(FedAvg())
    arrays, _ = wrapper.aggregate_train(1, replies)  # configure_train never ran
    assert [(r.site, r.reason) for r in wrapper.rejections[1]] == [("h5", "nan")]
    _assert_average_of(arrays, dict(enumerate(updates[:5])))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_cohort": 2}, "min_cohort must be >= 3, got 2"),
        ({"z_threshold": 0.0}, "z_threshold must be a finite number > 0, got 0.0"),
        ({"z_threshold": float("nan")}, "z_threshold must be a finite number > 0"),
        ({"min_relative_spread": -0.1}, "min_relative_spread must be a finite number >= 0"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScreeningStrategy(FedAvg(), **kwargs)


def test_reason_labels() -> None:
    assert screening_reason_label("norm") == "screened_norm"
    assert [screening_reason_label(r) for r in ("nan", "keys", "shape", "dtype")] == [
        "screened_nan", "screened_keys", "screened_shape", "screened_dtype"
    ]
    with pytest.raises(ValueError, match="must be one of nan, keys"):
        screening_reason_label("timeout")


def test_a_recorded_round_lists_screened_sites_as_failures_not_participants() -> None:
    from server.federation import RecordingStrategy

    base = _global()
    updates = _honest(5, base)
    updates[2] = _scaled(base, updates[2], 10.0)
    updates[4] = _set(updates[4], "w", (0, 0), float("nan"))
    inner = ScreeningStrategy(FedAvg(min_train_nodes=5, min_available_nodes=5), z_threshold=3.5)
    recording = RecordingStrategy(inner)
    sent = recording.configure_train(1, _record(base), ConfigRecord(), _grid(5))
    requests = sorted(sent, key=lambda m: m.metadata.dst_node_id)
    replies = [_reply(q, i, u) for i, (q, u) in enumerate(zip(requests, updates, strict=True))]
    arrays, _ = recording.aggregate_train(1, replies)
    log = recording.rounds[1]
    assert log.participants == ["h0", "h1", "h3"]
    screened = {(f["site"], f["kind"]) for f in log.failures}
    assert screened == {("h2", "screened_norm"), ("h4", "screened_nan")}
    _assert_average_of(arrays, {i: updates[i] for i in (0, 1, 3)})
