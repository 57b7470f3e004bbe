"""Flower's adaptive-clipping DP wrappers, with the clipping norm moving the right way.

The bug (Flower 1.41.0 and 1.42.0, flwr/serverapp/strategy/dp_adaptive_clipping.py, the Message
API wrappers added in flwrlabs/flower#5905): the norm bit is 1 for a *clipped* update
(`adaptive_clip_inputs_inplace` in flwr/supercore/differential_privacy.py returns
`scaling_factor < 1`), `_noisy_fraction` turns the count of those bits into the clipped fraction,
yet `_geometric_update` sets C <- C exp(-lr (clipped_fraction - target_clipped_quantile)). When
every update is clipped the norm shrinks further, and it runs to zero. Andrew et al. (2021),
whose rule this is, count *unclipped* updates in that formula; with the clipped fraction the sign
flips, so here the norm grows until about `target_clipped_quantile` of the updates are clipped.
Flower's legacy wrappers (flwr/server/strategy/dp_adaptive_clipping.py) have the same formula;
medfed does not use them. No Flower issue was found for it.

Gate: the accounting and the privacy figures are medfed's; a wrong norm would not leak, but it
would quietly destroy the model, so on a Flower release this was not checked against the
wrappers refuse to be built. tests/common/flower_compat/test_adaptive_clipping.py shows Flower's
own update shrinking the norm (it fails when Flower fixes the bug: drop this patch then).
"""

from __future__ import annotations

import math
from typing import Any

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
)

from common.flower_compat import Gate

GATE = Gate(
    patch="central DP's adaptive clipping fix (--central-dp server-adaptive/client-adaptive)",
    flower_code="flwr/serverapp/strategy/dp_adaptive_clipping.py (_geometric_update)",
    test="tests/common/flower_compat/test_adaptive_clipping.py",
)


class ClipNormFix:
    """Mixin: the geometric update of Andrew et al. (2021), written for the clipped fraction."""

    clipping_norm: float
    clip_norm_lr: float
    target_clipped_quantile: float

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        GATE.require()
        super().__init__(*args, **kwargs)

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.clipping_norm *= math.exp(
            self.clip_norm_lr * (clipped_fraction - self.target_clipped_quantile)
        )


class ServerSideAdaptiveClipping(ClipNormFix, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping with the norm update fixed."""


class ClientSideAdaptiveClipping(ClipNormFix, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping with the norm update fixed."""
