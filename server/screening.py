"""A strategy wrapper that screens each site's training update before it is aggregated.

A hospital whose client is broken or compromised can send an update that ruins the global model
for everyone: NaN weights, arrays of the wrong shape, or a scaled or sign-flipped update that
outweighs the honest sites. `ScreeningStrategy` checks every successful reply against the global
model sent that round and against the other sites' updates, drops the ones that fail, records
why, and hands the rest to the wrapped strategy unchanged.

The norm check uses a robust z-score, z = 0.6745 * (norm - median) / spread, where the spread is
the median absolute deviation (MAD) of the cohort's update norms, floored at a fraction of the
median (`min_relative_spread`) so a tight cohort does not make a mild straggler an outlier.
Only the high side is rejected:
a scaled or sign-flipped update has a large norm, while a small one (a site with little data or
few local steps) only pulls the average a little towards the global model it started from.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

log = logging.getLogger("medfed.server")

REASONS = ("nan", "keys", "shape", "dtype", "norm")


@dataclass(frozen=True)
class Rejection:
    """One update dropped before aggregation: whose, which check it failed, and the evidence."""

    node_id: int
    site: str
    reason: str  # one of REASONS
    detail: str


def screening_reason_label(reason: str) -> str:
    """The failure-reason label metrics use for an update rejected with `reason`."""
    if reason not in REASONS:
        raise ValueError(f"screening reason must be one of {', '.join(REASONS)}, got {reason!r}")
    return f"screened_{reason}"


def _site_name(msg: Message) -> str:
    site = msg.content.config_records.get("site")
    if site is not None and "name" in site:
        return str(site["name"])
    return str(msg.metadata.src_node_id)


def _arrays(msg: Message) -> dict[str, np.ndarray] | str:
    """The reply's arrays by name, or why they cannot be read as one model."""
    records = list(msg.content.array_records.values())
    if len(records) != 1:
        return f"expected one ArrayRecord, got {len(records)}"
    return {name: array.numpy() for name, array in records[0].items()}


def _structural_problem(
    arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None
) -> tuple[str, str] | None:
    """(reason, detail) for the first of checks nan, keys, shape, dtype that fails, else None."""
    for name, array in arrays.items():
        if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            return "nan", f"array {name!r} has {bad} NaN/Inf value(s) of {array.size}"
    if reference is None:
        return None
    if set(arrays) != set(reference):
        missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
        return "keys", f"missing arrays {missing}, unexpected arrays {extra}"
    for attr in ("shape", "dtype"):
        for name, array in arrays.items():
            got, want = getattr(array, attr), getattr(reference[name], attr)
            if got != want:
                return attr, f"array {name!r} has {attr} {got}, global {want}"
    return None


def update_norm(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 norm of `arrays - reference` over all arrays together, in float64."""
    total = 0.0
    # Overflow gives an infinite norm, which the caller rejects; the warning would only be noise.
    with np.errstate(over="ignore"):
        for name, array in arrays.items():
            delta = array.astype(np.float64) - reference[name].astype(np.float64)
            total += float(np.sum(np.square(np.abs(delta))))
    return math.sqrt(total)


class ScreeningStrategy(Strategy):
    """Delegate to `strategy`, dropping training updates that fail screening.

    Rejections are kept in `self.rejections` (round -> list; an empty list means the round was
    screened and nothing was dropped) and logged at WARNING.

    Args:
        z_threshold: reject an update whose norm's robust z-score exceeds this; None turns the
            norm check off (the structural checks always run).
        min_cohort: run the norm check only when at least this many updates passed the structural
            checks; below it the median says too little about what an honest norm is.
        min_relative_spread: lower bound on the spread, as a fraction of the median norm. With
            MAD alone, a cohort of near-identical updates (IID sites, or MAD 0 when half the sites
            sent bitwise-equal norms) would make a harmless 1.05x update an "outlier". With the
            default 0.1 and z 3.5 an update is rejected only above ~1.5x the median norm, which
            still catches scaled (x5, x10) and sign-flipped-and-scaled updates.

    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        z_threshold: float | None = 3.5,
        min_cohort: int = 3,
        min_relative_spread: float = 0.1,
    ) -> None:
        if z_threshold is not None and not (math.isfinite(z_threshold) and z_threshold > 0):
            raise ValueError(f"z_threshold must be a finite number > 0, got {z_threshold}")
        if min_cohort < 3:
            raise ValueError(
                f"min_cohort must be >= 3, got {min_cohort}: with fewer updates the median "
                "absolute deviation cannot single out an outlier"
            )
        if not (math.isfinite(min_relative_spread) and min_relative_spread >= 0):
            raise ValueError(
                f"min_relative_spread must be a finite number >= 0, got {min_relative_spread}"
            )
        self.strategy = strategy
        self.z_threshold = z_threshold
        self.min_cohort = min_cohort
        self.min_relative_spread = min_relative_spread
        self.rejections: dict[int, list[Rejection]] = {}
        self._global: tuple[int, dict[str, np.ndarray]] | None = None

    def _reject(self, server_round: int, msg: Message, reason: str, detail: str) -> None:
        rejection = Rejection(msg.metadata.src_node_id, _site_name(msg), reason, detail)
        self.rejections[server_round].append(rejection)
        log.warning(
            "round %d: rejected the update from site %s (%s): %s",
            server_round, rejection.site, screening_reason_label(reason), detail,
        )

    def _screen_norms(
        self, server_round: int, norms: dict[int, float], replies: list[Message]
    ) -> set[int]:
        """Indices (into `replies`) of updates whose norm is non-finite or a high outlier."""
        bad = {i for i, norm in norms.items() if not math.isfinite(norm)}
        for i in sorted(bad):
            self._reject(server_round, replies[i], "norm", f"update norm is {norms[i]}")
        cohort = np.array([norm for i, norm in norms.items() if i not in bad])
        if len(cohort) < self.min_cohort:
            return bad
        median = float(np.median(cohort))
        spread = max(float(np.median(np.abs(cohort - median))), self.min_relative_spread * median)
        if spread == 0:
            # At least half the sites sent bitwise-equal norms (typically: returned the global
            # model unchanged, so the median is 0). There is no scale to judge by, and rejecting
            # every site that differs, i.e. every site that trained, is worse than not screening.
            log.warning(
                "round %d: norm screening skipped, half the sites sent update norm %.4g",
                server_round, median,
            )
            return bad
        for i, norm in norms.items():
            z = 0.6745 * (norm - median) / spread
            if i not in bad and self.z_threshold is not None and z > self.z_threshold:
                bad.add(i)
                detail = (
                    f"update norm {norm:.4g}, cohort median {median:.4g} "
                    f"(z {z:.1f} > {self.z_threshold})"
                )
                self._reject(server_round, replies[i], "norm", detail)
        return bad

    # --- Strategy interface ---------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the wrapped strategy sample sites; remember the global model it sends them."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        sent = _arrays(messages[0]) if messages else None
        self._global = (server_round, sent) if isinstance(sent, dict) else None
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop updates that fail screening, then aggregate the rest with the wrapped strategy."""
        replies = list(replies)
        self.rejections.setdefault(server_round, [])
        reference = self._global[1] if self._global and self._global[0] == server_round else None
        if reference is None:
            log.warning(
                "round %d: no global model was recorded by configure_train; only the NaN/Inf "
                "check runs", server_round,
            )
        rejected: set[int] = set()
        norms: dict[int, float] = {}
        for i, msg in enumerate(replies):
            if msg.has_error():
                continue
            arrays = _arrays(msg)
            if isinstance(arrays, str):
                problem: tuple[str, str] | None = ("keys", arrays)
            else:
                problem = _structural_problem(arrays, reference)
                if problem is None and reference is not None:
                    norms[i] = update_norm(arrays, reference)
            if problem is not None:
                self._reject(server_round, msg, *problem)
                rejected.add(i)
        if self.z_threshold is not None:
            rejected |= self._screen_norms(server_round, norms, replies)
        kept = [msg for i, msg in enumerate(replies) if i not in rejected]
        if rejected and not any(not msg.has_error() for msg in kept):
            log.warning("round %d: every update was rejected; nothing to aggregate", server_round)
            return None, None
        return self.strategy.aggregate_train(server_round, kept)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the wrapped strategy choose the evaluating sites."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate evaluation metrics with the wrapped strategy (they carry no model)."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log the screening settings, then the wrapped strategy's summary."""
        log.info(
            "update screening: z_threshold %s, min_cohort %d, min_relative_spread %s",
            self.z_threshold, self.min_cohort, self.min_relative_spread,
        )
        self.strategy.summary()
