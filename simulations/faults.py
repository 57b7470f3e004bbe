"""Faults and misbehaving sites, injected into a simulation (never into a deployed site).

Everything is decided from the run's seed and the site's name, so the same scenario fails the
same sites in the same rounds on every machine and in every worker process:

- dropout: in each round, each site fails with probability `dropout`: its train and evaluate
  handlers raise `InjectedFault`, and the aggregator records the failure with that reason.
- stragglers: in each round, each site is late with probability `straggler`: it sleeps
  `straggler_delay` seconds before training. Past the run's round timeout (`run.round_timeout`)
  the reply is lost and the aggregator records a timeout; below it, the site is only slow.
- misbehaving sites (a fixed set for the whole run):
  - `scale`: sends global + scale * (local - global), a boosted update (default 10x);
  - `sign_flip`: sends global - sign_flip * (local - global): the step reversed and, by
    default, 4x as long; with 20% such sites FedAvg's step cancels (0.8 * 1 - 0.2 * 4 = 0);
    factor -1 alone only slows FedAvg down and would hide what robust aggregation is for;
  - `nan`: sends arrays full of NaN (a diverged or corrupted client);
  - `label_flip`: trains honestly on flipped labels (label' = num_classes - 1 - label), which is
    data-level: `flip_labels`, applied to the site's training split by the simulation's loader.

Two Flower client mods inject them: `OutageMod` around the whole site, `TamperMod` around its
train handler. Every injected fault is
also appended to RUN_DIR/faults.jsonl (round, site, fault), the ground truth to compare
results.json's failures and screening decisions against.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from common.sites import SiteRef

log = logging.getLogger("medfed.simulations")

MISBEHAVIOURS = ("label_flip", "scale", "sign_flip", "nan")
MODEL_LEVEL = ("scale", "sign_flip", "nan")
FAULTS_FILE = "faults.jsonl"
INJECTED_MARK = "simulated fault"


class InjectedFault(RuntimeError):
    """A failure the scenario asked for; its text names the site, the fault and the round."""


@dataclass(frozen=True)
class FaultSpec:
    """What can go wrong in a scenario (the `[faults]` and `[misbehave]` tables)."""

    dropout: float = 0.0
    straggler: float = 0.0
    # seconds a straggler is late; 0: the run's round timeout + 5 s (its reply is lost)
    straggler_delay: float = 0.0
    misbehave_fraction: float = 0.0
    # explicit misbehaving sites, name -> kind (instead of a fraction)
    misbehave_sites: Mapping[str, str] = field(default_factory=dict)
    kinds: tuple[str, ...] = ("scale", "sign_flip")
    scale: float = 10.0
    sign_flip: float = 4.0

    def __post_init__(self) -> None:
        for key in ("dropout", "straggler"):
            value = getattr(self, key)
            if not 0 <= value < 1:
                raise ValueError(f"faults.{key} must be a probability in [0, 1), got {value}")
        if self.straggler_delay < 0:
            raise ValueError(
                f"faults.straggler_delay must be >= 0 seconds (0: past the round timeout), "
                f"got {self.straggler_delay}"
            )
        if not 0 <= self.misbehave_fraction <= 1:
            raise ValueError(
                f"misbehave.fraction must be in [0, 1], got {self.misbehave_fraction}"
            )
        if self.misbehave_fraction and self.misbehave_sites:
            raise ValueError("give misbehave.fraction or misbehave.sites, not both")
        if not self.kinds:
            raise ValueError(
                f"misbehave.kinds must name at least one of {', '.join(MISBEHAVIOURS)}"
            )
        for kind in [*self.kinds, *self.misbehave_sites.values()]:
            if kind not in MISBEHAVIOURS:
                raise ValueError(
                    f"misbehaviour {kind!r} unknown; use one of {', '.join(MISBEHAVIOURS)}"
                )
        if not self.scale > 0:
            raise ValueError(f"misbehave.scale must be > 0 (e.g. 10), got {self.scale}")
        if not self.sign_flip > 0:
            raise ValueError(
                f"misbehave.sign_flip must be > 0 (the update is multiplied by minus it, e.g. 4), "
                f"got {self.sign_flip}"
            )

    @property
    def any(self) -> bool:
        """Whether the scenario injects anything at all."""
        return bool(
            self.dropout or self.straggler or self.misbehave_fraction or self.misbehave_sites
        )

    def plan(self, names: Sequence[str], *, seed: int, round_timeout: float) -> FaultPlan:
        """Decide, from `seed`, which of the sites `names` misbehave and how."""
        unknown = sorted(set(self.misbehave_sites) - set(names))
        if unknown:
            raise ValueError(
                f"misbehave.sites names {', '.join(unknown[:5])}, not sites of this federation "
                f"({names[0]} ... {names[-1]})"
            )
        misbehaving = dict(self.misbehave_sites)
        if self.misbehave_fraction:
            count = int(round(self.misbehave_fraction * len(names)))
            rng = np.random.default_rng([seed, 0xBAD])
            chosen = rng.choice(len(names), size=count, replace=False)
            misbehaving = {names[int(i)]: self.kinds[k % len(self.kinds)]
                           for k, i in enumerate(chosen)}
        return FaultPlan(
            seed=seed, dropout=self.dropout, straggler=self.straggler,
            straggler_delay=self.straggler_delay or round_timeout + 5.0,
            misbehaving=misbehaving, scale=self.scale, sign_flip=self.sign_flip,
        )


def _draw(seed: int, salt: int, server_round: int, site: str) -> float:
    rng = np.random.default_rng([seed, salt, server_round, zlib.crc32(site.encode())])
    return float(rng.random())


@dataclass(frozen=True)
class FaultPlan:
    """The scenario's faults made concrete: pure functions of (seed, round, site)."""

    seed: int = 0
    dropout: float = 0.0
    straggler: float = 0.0
    straggler_delay: float = 0.0
    misbehaving: Mapping[str, str] = field(default_factory=dict)
    scale: float = 10.0
    sign_flip: float = 4.0

    def dropped(self, server_round: int, site: str) -> bool:
        """Whether `site` fails round `server_round`."""
        return self.dropout > 0 and _draw(self.seed, 0xD0, server_round, site) < self.dropout

    def straggles(self, server_round: int, site: str) -> bool:
        """Whether `site` is late in round `server_round` (never when it drops out)."""
        return (
            self.straggler > 0
            and not self.dropped(server_round, site)
            and _draw(self.seed, 0x57, server_round, site) < self.straggler
        )

    def kind(self, site: str) -> str | None:
        """How `site` misbehaves for the whole run, or None."""
        return self.misbehaving.get(site)

    def faults_in_round(self, server_round: int, sites: Sequence[str]) -> dict[str, str]:
        """Site -> "dropout" or "straggler" for the sites among `sites` that fail this round."""
        out = {}
        for site in sites:
            if self.dropped(server_round, site):
                out[site] = "dropout"
            elif self.straggles(server_round, site):
                out[site] = "straggler"
        return out

    def factor(self, kind: str) -> float:
        """The multiplier of (local - global) that misbehaviour `kind` sends."""
        return {"scale": self.scale, "sign_flip": -self.sign_flip}[kind]


def flip_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Flip labels: num_classes - 1 - label (0 <-> 1 for a binary task); -1 (unlabelled) stays."""
    return np.where(labels >= 0, num_classes - 1 - labels, labels)


def tamper(
    global_arrays: ArrayRecord, local: ArrayRecord, kind: str, plan: FaultPlan
) -> ArrayRecord:
    """The update a site misbehaving as `kind` sends instead of `local`."""
    out: dict[str, Array] = {}
    for name, array in local.items():
        value = array.numpy()
        if np.issubdtype(value.dtype, np.floating):
            if kind == "nan":
                value = np.full_like(value, np.nan)
            else:
                start = global_arrays[name].numpy()
                value = (start + plan.factor(kind) * (value - start)).astype(value.dtype)
        out[name] = Array.from_numpy_ndarray(np.ascontiguousarray(value))
    return ArrayRecord(out)


@dataclass(frozen=True)
class _FaultMod:
    """What both fault mods share: the plan, the site names by partition-id, the fault log."""

    plan: FaultPlan
    sites: Sequence[SiteRef]
    log_file: Path | None = None

    def _where(self, msg: Message, context: Context) -> tuple[str, int, str]:
        """(site name, server round, stage) of a message."""
        site = self.sites[int(context.node_config["partition-id"])].name
        config = msg.content.config_records.get("config")
        server_round = int(config.get("server-round", 0)) if config else 0  # type: ignore[arg-type]
        return site, server_round, msg.metadata.message_type.split(".")[0]

    def _record(self, server_round: int, site: str, stage: str, fault: str) -> None:
        log.info("site %s: injecting %s in round %d (%s)", site, fault, server_round, stage)
        if self.log_file is None:
            return
        line = json.dumps({"round": server_round, "site": site, "stage": stage, "fault": fault})
        # one short O_APPEND write per line: workers in several processes do not interleave
        fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


@dataclass(frozen=True)
class OutageMod(_FaultMod):
    """A client mod around the whole site: dropouts fail the round, stragglers arrive late.

    Outermost, so that the aggregator gets the injected error's own text (site, fault, round).
    """

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """Fail or delay this site's round as the plan says."""
        site, server_round, stage = self._where(msg, context)
        if self.plan.dropped(server_round, site):
            self._record(server_round, site, stage, "dropout")
            raise InjectedFault(
                f"site {site}: {INJECTED_MARK}: dropout in round {server_round} "
                f"(faults.dropout = {self.plan.dropout:g})"
            )
        if stage == MessageType.TRAIN and self.plan.straggles(server_round, site):
            self._record(server_round, site, stage, "straggler")
            time.sleep(self.plan.straggler_delay)
        return call_next(msg, context)


@dataclass(frozen=True)
class TamperMod(_FaultMod):
    """A client mod around the train handler: misbehaving sites send a tampered update.

    Inside the site's outbound guard and before SecAgg+ masking: the site's software itself
    sends the bad update.
    """

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """Replace a misbehaving site's update as its kind says."""
        reply = call_next(msg, context)
        site, server_round, stage = self._where(msg, context)
        kind = self.plan.kind(site)
        if stage == MessageType.TRAIN and kind in MODEL_LEVEL and not reply.has_error():
            sent = msg.content.array_records["arrays"]
            local = reply.content.array_records["arrays"]
            reply.content["arrays"] = tamper(sent, local, kind, self.plan)
            self._record(server_round, site, stage, kind)
        return reply


def read_fault_log(run_dir: Path) -> list[dict[str, object]]:
    """The faults a simulation injected, in the order they happened (RUN_DIR/faults.jsonl)."""
    path = Path(run_dir) / FAULTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
