"""Flower's adaptive clipping moves the norm the wrong way; the fixed wrappers move it right.

The first test is the evidence: it shows the bug in the installed Flower, and fails the day Flower
fixes it (then drop the patch). The rest show the fix, on the same inputs.
"""

import math

import flwr
import numpy as np
import pytest
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAvg,
)

from common.flower_compat import FlowerVersionError
from common.flower_compat.adaptive_clipping import (
    ClientSideAdaptiveClipping,
    ServerSideAdaptiveClipping,
)

PAIRS = [
    (DifferentialPrivacyServerSideAdaptiveClipping, ServerSideAdaptiveClipping),
    (DifferentialPrivacyClientSideAdaptiveClipping, ClientSideAdaptiveClipping),
]


def _wrapper(cls: type, norm: float = 1.0):
    return cls(FedAvg(), noise_multiplier=0.5, num_sampled_clients=4, initial_clipping_norm=norm,
               target_clipped_quantile=0.5, clip_norm_lr=0.2, clipped_count_stddev=1.0)


@pytest.mark.parametrize("flowers", [p[0] for p in PAIRS])
def test_flowers_own_update_shrinks_the_norm_when_every_update_is_clipped(flowers: type) -> None:
    wrapper = _wrapper(flowers)
    wrapper._geometric_update(1.0)  # every update clipped (Flower's norm bit: 1 when clipped)
    assert wrapper.clipping_norm < 1.0, "Flower fixed its sign: drop ClipNormFix and its gate"


@pytest.mark.parametrize(("flowers", "fixed"), PAIRS)
def test_the_norm_grows_when_too_many_are_clipped_and_shrinks_when_too_few(
    flowers: type, fixed: type
) -> None:
    assert issubclass(fixed, flowers)
    wrapper = _wrapper(fixed)
    wrapper._geometric_update(1.0)
    assert wrapper.clipping_norm == pytest.approx(math.exp(0.2 * 0.5))
    wrapper._geometric_update(0.0)  # none clipped: back down
    assert wrapper.clipping_norm == pytest.approx(1.0)
    wrapper._geometric_update(0.5)  # at the target quantile: unchanged
    assert wrapper.clipping_norm == pytest.approx(1.0)


@pytest.mark.parametrize("start", [0.05, 5.0])
def test_the_norm_settles_where_the_target_fraction_is_clipped(start: float) -> None:
    # 100 update norms spread over 0.01..10, the exact clipped fraction each round: the fixed
    # rule brings the norm to their median (target 0.5) from either side; Flower's runs away
    # from it, to zero from below and without bound from above.
    norms = np.geomspace(0.01, 10, 100)
    median = float(np.median(norms))

    def settle(cls: type) -> float:
        wrapper = _wrapper(cls, norm=start)
        for _ in range(400):
            wrapper._geometric_update(float(np.mean(norms > wrapper.clipping_norm)))
        return float(wrapper.clipping_norm)

    assert settle(ServerSideAdaptiveClipping) == pytest.approx(median, rel=0.25)
    flowers = settle(DifferentialPrivacyServerSideAdaptiveClipping)
    assert flowers < 0.01 if start < median else flowers > 1e3


@pytest.mark.parametrize("fixed", [p[1] for p in PAIRS])
def test_an_unchecked_flower_release_builds_no_wrapper(
    fixed: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    with pytest.raises(FlowerVersionError, match="Flower 9.9.9 is installed.*_geometric_update"):
        _wrapper(fixed)
