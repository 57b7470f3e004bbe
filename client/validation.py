"""What a DP site releases about its validation split, accounted apart from its training.

A site's training images are protected by DP-SGD, whose spend is Opacus's accountant over the
run's (noise, sample rate, steps) and nothing else. Two statistics of the site's *validation*
images also leave it, each once per run with Gaussian noise (L2 sensitivity 1: one image moves
one count by one):

- its class counts, the class prior of logit adjustment (common.training.tasks.classify), released
  before the site's first training round;
- its per-class histograms of validation scores (common.operating), from which the aggregator
  chooses the operating point, released in the final round.

Training and validation images are disjoint, so the two mechanisms compose in parallel: an
image's privacy loss is its own split's epsilon. The validation releases therefore have their
own state (privacy/<run-key>.validation.json) and their own ledger entries, on the validation
images' content; the training epsilon stays exactly what Opacus's accountant says.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from client.ledger import BudgetRefused, PrivacyLedger
from common.config import RunConfig
from common.privacy import PrivacyState, epsilon_of
from common.sites import SiteRef

log = logging.getLogger("medfed.client")


def state_path(site: SiteRef, run_key: str) -> Path:
    """Where the site keeps the validation releases' state for one run."""
    return site.state_dir / "privacy" / f"{run_key}.validation.json"


def _ledger_run(run_key: str) -> str:
    # the ledger keeps one history per run; the validation releases are a mechanism of their own
    return f"{run_key}.validation"


def plan(cfg: RunConfig, releases: dict[str, float]) -> PrivacyState:
    """The validation releases' noise, scaled up (never down) until they fit the target."""
    scale = 1.0
    while epsilon_of([(s * scale, 1.0, 1) for s in releases.values()], delta=cfg.delta,
                     accountant=cfg.accountant) > cfg.target_epsilon and scale < 1e4:
        scale *= 1.25
    return PrivacyState(
        noise_multiplier=0.0, sample_rate=1.0, planned_steps=0,
        target_epsilon=cfg.target_epsilon, delta=cfg.delta, accountant=cfg.accountant,
        max_grad_norm=0.0, releases={k: s * scale for k, s in releases.items()},
    )


def release(
    site: SiteRef, cfg: RunConfig, run_key: str, releases: dict[str, float], name: str,
    values: np.ndarray, *, budget: float | None, ledger_dir: Path | None,
) -> tuple[np.ndarray, float] | None:
    """`values` of the validation split with their planned noise, and the split's epsilon.

    Made once per run (a second call returns the same noisy values). The release is reserved
    in the ledger of the validation images before it is made and committed after; a release
    the budget refuses is not made (None).
    """
    path = state_path(site, run_key)
    state = PrivacyState.load(path) if path.is_file() else plan(cfg, releases)
    if name in state.released:
        return np.asarray(state.released[name]).reshape(np.shape(values)), state.epsilon()
    ledger = PrivacyLedger(site.data_dir, ledger_dir, subset=site.subset, split="val",
                           seed=cfg.seed)
    try:
        ledger.reserve_round(run=_ledger_run(run_key), site=site.name, budget=budget,
                             history=state.history,
                             this_round=(state.releases[name], 1.0, 1))
    except BudgetRefused as exc:
        log.warning("%s of the validation split not released: %s", name, exc)
        return None
    noisy = state.release(name, values)
    state.save(path)
    ledger.commit(run=_ledger_run(run_key), site=site.name, history=state.history)
    return np.asarray(noisy).reshape(np.shape(values)), state.epsilon()


def spent(site: SiteRef, run_key: str) -> float | None:
    """The validation split's epsilon so far in this run (None: nothing released)."""
    path = state_path(site, run_key)
    return PrivacyState.load(path).epsilon() if path.is_file() else None


def released_noise(site: SiteRef, run_key: str, name: str) -> float:
    """The Gaussian noise multiplier release `name` was made with (scaled to fit the target)."""
    return float(PrivacyState.load(state_path(site, run_key)).releases[name])
