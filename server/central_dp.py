"""User-level (central) differential privacy: Flower's clipping wrappers plus exact accounting.

Local DP-SGD protects each image at each site. Central DP protects each *site*: every site's
update is clipped to an L2 norm, the aggregate gets Gaussian noise, and a whole hospital's
participation is hidden. medfed uses Flower's own wrappers for the mechanism
(`DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping`, client-side with Flower's
clipping mods at the sites) and adds what they leave out in 1.41: an accountant that runs without
the optional `dp-accounting` package and counts what was really released.

Accounting (Opacus's RDP accountant, the one the sites' ledgers use):
- Each round that produces an aggregate is one Gaussian release at sample rate 1: no
  amplification by sampling is claimed, so the figure holds however sites were chosen.
- Flower sizes the noise for `num_sampled` sites: std sigma * C / num_sampled on the mean. When
  only m sites' updates reach the mean (dropouts, screening), the mean's sensitivity is C / m and
  the effective noise multiplier is sigma * m / num_sampled; that is what is recorded.
- Adaptive clipping uses Flower's wrappers with their clipping-norm update fixed
  (common.flower_compat.adaptive_clipping: Flower 1.41 moves the norm the wrong way).
- Adaptive clipping also releases a noised count of clipped updates; Flower splits sigma between
  the two queries, and the pair composes back to sigma (Andrew et al., 2021), so the same rule
  applies with the update part scaled.
- Error replies are left out before Flower's wrapper sees the round (it would skip the round).
- Sites' updates must weigh the same (the sensitivity of a weighted mean depends on the
  weights), so with central DP the strategy weighs every site by the `unit-weight` metric.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from common.config import RunConfig
from common.flower_compat.adaptive_clipping import (
    ClientSideAdaptiveClipping,
    ServerSideAdaptiveClipping,
)
from common.privacy import Step, calibrate_noise, epsilon_of

log = logging.getLogger("medfed.server")

# Central DP is accounted with RDP whatever --accountant the sites use: PRV and GDP are
# approximations made for subsampled DP-SGD, not for a handful of full-batch releases.
CENTRAL_ACCOUNTANT = "rdp"


def central_noise_multiplier(cfg: RunConfig) -> float:
    """--central-noise, or the noise at which `cfg.rounds` releases spend --target-epsilon."""
    if cfg.central_noise > 0:
        return cfg.central_noise
    return calibrate_noise(
        target_epsilon=cfg.target_epsilon, delta=cfg.delta, sample_rate=1.0, steps=cfg.rounds,
        accountant=CENTRAL_ACCOUNTANT,
    )


def sampled_sites(cfg: RunConfig, num_sites: int | None) -> int:
    """Sites FedAvg samples per round (`max(int(N * fraction), min)`); deployed: --min-sites."""
    if num_sites is None:
        return cfg.min_sites
    return max(int(num_sites * cfg.fraction_train), min(cfg.min_sites, num_sites))


@dataclass
class CentralLedger:
    """The aggregator's record of central-DP releases: one step per aggregated round."""

    mode: str
    noise_multiplier: float
    clipping_norm: float
    delta: float
    num_sampled: int
    history: list[Step] = field(default_factory=list)

    def epsilon(self) -> float:
        """Epsilon spent by every release so far (user level: one hospital's participation)."""
        return epsilon_of(self.history, delta=self.delta, accountant=CENTRAL_ACCOUNTANT)

    def summary(self) -> dict[str, Any]:
        """What results.json shows under `central_privacy`."""
        return {
            "mode": self.mode,
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "sites_per_round": self.num_sampled,
            "releases": len(self.history),
            "accountant": CENTRAL_ACCOUNTANT,
            "level": "site",
        }

    def to_state(self) -> dict[str, Any]:
        """JSON-able state for checkpoints."""
        return {"history": [list(step) for step in self.history]}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue the releases of a resumed run."""
        self.history = [(float(s), float(q), int(n)) for s, q, n in state.get("history", [])]


_Wrapper = (
    DifferentialPrivacyServerSideFixedClipping | DifferentialPrivacyClientSideFixedClipping
    | ServerSideAdaptiveClipping | ClientSideAdaptiveClipping
)


def _dp_wrapper(inner: Strategy, cfg: RunConfig, sigma: float, num_sampled: int) -> _Wrapper:
    if cfg.central_dp.endswith("fixed"):
        fixed: type[
            DifferentialPrivacyServerSideFixedClipping | DifferentialPrivacyClientSideFixedClipping
        ] = (
            DifferentialPrivacyServerSideFixedClipping
            if cfg.central_dp.startswith("server")
            else DifferentialPrivacyClientSideFixedClipping
        )
        return fixed(
            inner, noise_multiplier=sigma, clipping_norm=cfg.clip_norm,
            num_sampled_clients=num_sampled,
        )
    adaptive: type[ServerSideAdaptiveClipping | ClientSideAdaptiveClipping] = (
        ServerSideAdaptiveClipping if cfg.central_dp.startswith("server")
        else ClientSideAdaptiveClipping
    )
    # Flower's default count noise (num_sampled / 20) cannot carry sigma for a few hospitals;
    # at max(that, sigma) the update keeps sigma / sqrt(3/4), about 1.15 sigma, of the noise.
    return adaptive(
        inner, noise_multiplier=sigma, num_sampled_clients=num_sampled,
        initial_clipping_norm=cfg.clip_norm,
        clipped_count_stddev=max(num_sampled / 20, sigma),
    )


class CentralPrivacy(Strategy):
    """Flower's DP wrapper around `inner`, with every aggregate accounted in `ledger`."""

    def __init__(self, inner: Strategy, cfg: RunConfig, *, num_sites: int | None) -> None:
        sigma = central_noise_multiplier(cfg)
        num_sampled = sampled_sites(cfg, num_sites)
        self.dp = _dp_wrapper(inner, cfg, sigma, num_sampled)
        self.ledger = CentralLedger(
            mode=cfg.central_dp, noise_multiplier=sigma, clipping_norm=cfg.clip_norm,
            delta=cfg.delta, num_sampled=num_sampled,
        )

    def effective_noise(self, aggregated: int) -> float:
        """The noise multiplier a mean over `aggregated` updates really got this round."""
        sigma, m = self.ledger.noise_multiplier, self.ledger.num_sampled
        if isinstance(
            self.dp,
            DifferentialPrivacyServerSideFixedClipping | DifferentialPrivacyClientSideFixedClipping,
        ):
            return sigma * aggregated / m
        update = float(self.dp.noise_multiplier) * aggregated / m
        count = 2 * float(self.dp.clipped_count_stddev)
        return float((update**-2 + count**-2) ** -0.5)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's wrapper adds the clipping norm for client-side clipping."""
        return self.dp.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip (server-side), aggregate, add noise; record the release if one was made."""
        # Flower's wrappers skip the whole round when any reply is an error; a site that
        # dropped out or kept its budget has already been recorded, and the mean over the rest
        # is accounted at the noise it really got.
        ok = [msg for msg in replies if not msg.has_error()]
        if not ok:
            return None, None
        arrays, metrics = self.dp.aggregate_train(server_round, ok)
        if arrays is not None:
            self.ledger.history.append((self.effective_noise(len(ok)), 1.0, 1))
            self.ledger.clipping_norm = float(self.dp.clipping_norm)  # adaptive: moves
            log.info(
                "central DP round %d: %d updates, epsilon %.3f", server_round, len(ok),
                self.ledger.epsilon(),
            )
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation releases nothing about updates: delegated."""
        return self.dp.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegated."""
        return self.dp.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Flower's summary of the DP wrapper and the strategy inside."""
        self.dp.summary()
