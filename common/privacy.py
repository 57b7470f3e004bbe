"""Differential-privacy accounting for one site across all rounds of a run.

A site calibrates its noise multiplier once, for every step it may train in the whole run
(rounds x steps per round: --local-steps, or local epochs x batches per epoch), and keeps
Opacus's accountant history across rounds. The epsilon it reports is therefore the cumulative
epsilon of all its DP-SGD steps so far, never a per-round figure. The state is plain JSON on the
site's own disk, so a restarted site (or a resumed run) continues the same ledger instead of
starting from zero.
"""

from __future__ import annotations

import functools
import json
import math
import secrets
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as privacy_analysis
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

from common.atomic import atomic_open
from common.config import batches_per_epoch
from common.refusals import cut_refusal

# (noise multiplier, sample rate, number of steps), as Opacus's accountants keep their history
Step = tuple[float, float, int]


# A site's refusal to train past its budget carries this, so the aggregator records a refusal
# (policy), not an error.
REFUSAL_MARK = "privacy budget refused"

# A site's privacy report: the epsilon its validation split spent on releases (client.validation)
VALIDATION_EPSILON = "validation_epsilon"

# With central (user-level) DP every site sends this metric, always 1, and the aggregator weighs
# sites by it: the noise is calibrated to a mean in which each hospital counts the same.
UNIT_WEIGHT = "unit-weight"




def parse_refusal(reason: str) -> tuple[str, str | None] | None:
    """(the refusal text, the refusing site) from a reply's reason; None if not a budget refusal."""
    return cut_refusal(reason, REFUSAL_MARK)


class PrivacyBudgetSpent(RuntimeError):
    """Training further would take a site past the run's target epsilon."""


@functools.lru_cache(maxsize=1024)
def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Noise multiplier so that `steps` DP-SGD steps at `sample_rate` spend `target_epsilon`.

    Cached: Opacus's search takes up to a second, and sites of similar size ask the same.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


def _largest_searched_sigma() -> float:
    # get_noise_multiplier doubles sigma from 20 and gives up ("The privacy budget is too low")
    # once it passes MAX_SIGMA: the last noise it accepts is 10 * 2**16 = 655360
    sigma = 20.0
    while sigma * 2 <= MAX_SIGMA:
        sigma *= 2
    return sigma


@functools.lru_cache(maxsize=64)
def smallest_epsilon(*, delta: float, accountant: str) -> float:
    """The smallest target epsilon Opacus can calibrate noise for at `delta` (0.0: unknown).

    It is the epsilon of one step at the largest noise Opacus's search tries. At that noise a
    step's privacy loss is negligible (RDP: below 1e-9 for any site size, sample rate or number
    of steps), so what remains is the accountant's conversion at `delta`: the same for every
    site. RDP at delta 1e-5: about 0.103; PRV: about 0.01. GDP's own solver fails at such
    noise, so for it this is 0.0 and no bound is known here.
    """
    try:
        with warnings.catch_warnings():  # at such noise RDP's best order is its largest: known
            warnings.simplefilter("ignore")
            eps = epsilon_of([(_largest_searched_sigma(), 1.0, 1)], delta=delta,
                             accountant=accountant)
    except (ValueError, ArithmeticError):
        return 0.0
    return eps if math.isfinite(eps) else 0.0


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one subsampled Gaussian step at each of Opacus's default orders (read-only)."""
    rdp = privacy_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )
    rdp.setflags(write=False)
    return rdp


def epsilon_of(history: list[Step], *, delta: float, accountant: str) -> float:
    """Epsilon spent by a history of DP-SGD steps, exactly as a fresh Opacus accountant says.

    For RDP this is Opacus's own computation (the per-step RDP of each (sigma, q), times the
    steps, summed, then converted at `delta`) with the per-step RDP cached: a simulation plans
    and reports for thousands of sites whose (sigma, q) pairs repeat, and each fresh accountant
    spends ~0.1 s on them.
    """
    if not history:
        return 0.0
    if accountant == "rdp":
        rdp = sum(
            _rdp_per_step(float(q), float(s)) * int(n) for s, q, n in history
        )
        eps, _ = privacy_analysis.get_privacy_spent(
            orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
        )
        return float(eps)
    acc = create_accountant(accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


@dataclass
class PrivacyState:
    """One site's DP state for one run: the calibrated noise and the accountant history."""

    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    target_epsilon: float
    delta: float
    accountant: str
    max_grad_norm: float
    history: list[Step] = field(default_factory=list)
    # Statistics of the site's data released with Gaussian noise outside DP-SGD (a classifier's
    # class counts, its validation scores' histogram), each once per run, by name: the noise
    # multiplier planned for each, and the noisy values of those already released (kept, so a
    # later round reuses them instead of spending again). Each release of a statistic whose L2
    # sensitivity is 1 (one sample moves one count by one) is one Gaussian step at rate 1 in
    # `history`, so the accountant and the ledger see it like any other step.
    releases: dict[str, float] = field(default_factory=dict)
    released: dict[str, list[float]] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        """Steps taken so far (DP-SGD steps and releases)."""
        return sum(int(n) for _, _, n in self.history)

    def pending_releases(self) -> list[Step]:
        """The planned releases not made yet, as the steps they will add to the history."""
        return [(s, 1.0, 1) for name, s in sorted(self.releases.items())
                if name not in self.released]

    def release(self, name: str, values: np.ndarray) -> np.ndarray:
        """`values` (a sensitivity-1 statistic) with the Gaussian noise planned for `name`.

        Made once per run: the first call adds the noise (from the operating system's entropy,
        never the run's seed) and records the step; later calls return the same noisy values.
        """
        if name in self.released:
            return np.asarray(self.released[name], dtype=np.float64)
        if name not in self.releases:
            raise ValueError(f"release {name!r} was not planned for this run's privacy budget")
        sigma = self.releases[name]
        noise = np.random.default_rng(secrets.randbits(63)).normal(0.0, sigma, np.shape(values))
        noisy = np.asarray(values, dtype=np.float64) + noise
        self.history = [*self.history, (float(sigma), 1.0, 1)]
        self.released[name] = [float(v) for v in noisy.ravel()]
        return noisy

    def epsilon(self) -> float:
        """Cumulative epsilon over every step taken so far."""
        return epsilon_of(self.history, delta=self.delta, accountant=self.accountant)

    def record(self, history: list[Step]) -> None:
        """Replace the history with the accountant's after a round (it only grows)."""
        if sum(int(n) for _, _, n in history) < self.steps:
            raise ValueError("accountant history shrank: refusing to forget spent privacy budget")
        self.history = [(float(s), float(q), int(n)) for s, q, n in history]

    def ensure_room(self, remaining_steps: int) -> None:
        """Make the rest of the run fit the target epsilon, or refuse.

        The noise was calibrated for the steps planned at the start. When a run is extended (a
        resume with more rounds), those steps no longer cover it: the noise is recalibrated so
        that history plus `remaining_steps` spends at most the target. Raises
        PrivacyBudgetSpent when even very large noise cannot keep the site within it.
        """
        def spent_with(sigma: float) -> float:
            return epsilon_of(
                [*self.history, *self.pending_releases(),
                 (sigma, self.sample_rate, remaining_steps)],
                delta=self.delta, accountant=self.accountant,
            )

        if remaining_steps < 1 or spent_with(self.noise_multiplier) <= self.target_epsilon:
            return
        high = self.noise_multiplier
        while self.epsilon() < self.target_epsilon and high < 1e4:  # grow until the target fits
            high *= 2
            if spent_with(high) <= self.target_epsilon:
                break
        else:
            raise PrivacyBudgetSpent(
                f"has spent epsilon {self.epsilon():.3f} of the run's target "
                f"{self.target_epsilon:g}; it trains no further in this run (start a new run "
                "with a new budget)"
            )
        low = self.noise_multiplier
        for _ in range(30):  # bisect to the smallest noise that fits
            mid = (low + high) / 2
            low, high = (low, mid) if spent_with(mid) <= self.target_epsilon else (mid, high)
        self.noise_multiplier = high
        self.planned_steps = self.steps + remaining_steps

    def summary(self) -> dict[str, float | int | str]:
        """What a site reports: scalars only, no data-derived content beyond dataset size."""
        return {
            "epsilon": self.epsilon() if self.history else 0.0,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "accountant": self.accountant,
            "max_grad_norm": self.max_grad_norm,
        }

    def save(self, path: Path) -> None:
        """Write atomically so a crash mid-write never loses the spent budget."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as fh:
            json.dump(asdict(self), fh, indent=2)

    @classmethod
    def load(cls, path: Path) -> PrivacyState:
        """Read a state written by `save`."""
        raw = json.loads(path.read_text())
        raw["history"] = [tuple(step) for step in raw.get("history", [])]
        return cls(**raw)

    @classmethod
    def plan(
        cls,
        *,
        num_examples: int,
        batch_size: int,
        rounds: int,
        steps_per_round: int,
        target_epsilon: float,
        delta: float,
        accountant: str,
        max_grad_norm: float,
    ) -> PrivacyState:
        """Calibrate the noise once for every step this site may train in the run."""
        # Opacus's DPDataLoader sets the sample rate to 1 / len(loader) and takes that many
        # steps per epoch; planning with the same numbers makes the plan and the ledger agree.
        sample_rate = 1.0 / batches_per_epoch(num_examples, batch_size)
        planned = rounds * steps_per_round
        state = cls(
            noise_multiplier=0.0,
            sample_rate=sample_rate,
            planned_steps=planned,
            target_epsilon=target_epsilon,
            delta=delta,
            accountant=accountant,
            max_grad_norm=max_grad_norm,
        )
        sigma = calibrate_noise(
            target_epsilon=target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=planned,
            accountant=accountant,
        )
        if not math.isfinite(sigma):
            raise ValueError(f"could not calibrate noise for epsilon {target_epsilon}")
        state.noise_multiplier = sigma
        return state
