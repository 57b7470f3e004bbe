"""A hospital's run policy: which runs its site agrees to train, kept in its own kit.

    [policy]
    require-dp = true          # default: a kit without [policy] requires DP
    max-epsilon = 8.0          # the largest target epsilon of one run (absent: no limit)
    tasks = ["classify"]       # absent: every task
    strategies = ["fedavg"]    # absent: every strategy

The policy is the hospital's, like its privacy budget: nothing the aggregator sends changes it.
client.policy enforces it at the site on the run's signed config. This module imports no flwr:
provisioning and the site's CLI read and write it too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.config import RunConfig
from common.refusals import cut_refusal
from common.registry import STRATEGIES, TASKS

# A site's refusal of a run (unsigned, untrusted signer, or outside its policy) carries this, so
# the aggregator records a refusal (policy), not an error.
RUN_REFUSAL_MARK = "run refused by site policy"


def parse_run_refusal(reason: str) -> tuple[str, str | None] | None:
    """(the refusal text, the refusing site) from a reply's reason; None if not a run refusal."""
    return cut_refusal(reason, RUN_REFUSAL_MARK)


class PolicyError(ValueError):
    """A policy value is invalid; the message names the flag or kit key and the rule."""


def check_max_epsilon(value: float, flag: str = "--max-epsilon") -> float:
    """A finite epsilon > 0; PolicyError naming `flag` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value <= 0:
        raise PolicyError(f"{flag} must be a finite number > 0 (e.g. 8), got {value!r}")
    return float(value)


def check_names(values: Sequence[str], known: Sequence[str], flag: str) -> tuple[str, ...]:
    """Known names, without duplicates, at least one; PolicyError naming `flag` otherwise."""
    names = tuple(dict.fromkeys(str(v).strip() for v in values if str(v).strip()))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PolicyError(
            f"{flag}: unknown {', '.join(repr(n) for n in unknown)}; known: {', '.join(known)}"
        )
    if not names:
        raise PolicyError(f"{flag} allows nothing; name at least one of {', '.join(known)} "
                          "(or `all`)")
    return names


@dataclass(frozen=True)
class RunPolicy:
    """What a site agrees to train. Empty `tasks`/`strategies`: all of them."""

    require_dp: bool = True
    max_epsilon: float | None = None
    tasks: tuple[str, ...] = ()
    strategies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_epsilon is not None:
            check_max_epsilon(self.max_epsilon, "max-epsilon")
        if self.tasks:
            check_names(self.tasks, TASKS, "tasks")
        if self.strategies:
            check_names(self.strategies, STRATEGIES, "strategies")

    @classmethod
    def from_toml(cls, table: Any, where: str) -> RunPolicy:
        """Read a kit's `[policy]` table (None: the default); PolicyError naming `where`."""
        if table is None:
            return cls()
        if not isinstance(table, dict):
            raise PolicyError(f"{where}: [policy] must be a table")
        unknown = sorted(set(table) - {"require-dp", "max-epsilon", "tasks", "strategies"})
        if unknown:
            raise PolicyError(f"{where}: [policy] has unknown keys {', '.join(unknown)}; known: "
                              "require-dp, max-epsilon, tasks, strategies")
        require_dp = table.get("require-dp", True)
        if not isinstance(require_dp, bool):
            raise PolicyError(f"{where}: [policy] require-dp must be true or false")
        try:
            return cls(
                require_dp=require_dp,
                max_epsilon=table.get("max-epsilon"),
                tasks=_names(table.get("tasks"), TASKS, "tasks"),
                strategies=_names(table.get("strategies"), STRATEGIES, "strategies"),
            )
        except PolicyError as exc:
            raise PolicyError(f"{where}: [policy] {exc}") from None

    def to_toml(self) -> dict[str, Any]:
        """The `[policy]` table."""
        table: dict[str, Any] = {"require-dp": self.require_dp}
        if self.max_epsilon is not None:
            table["max-epsilon"] = self.max_epsilon
        if self.tasks:
            table["tasks"] = list(self.tasks)
        if self.strategies:
            table["strategies"] = list(self.strategies)
        return table

    def violations(self, cfg: RunConfig) -> list[str]:
        """What in this run the policy does not allow, each with the kit setting that decides."""
        found = []
        if self.require_dp and not cfg.dp:
            found.append("the run trains without differential privacy and this site requires "
                         "it (policy require-dp)")
        if self.max_epsilon is not None:
            if not cfg.dp:  # no DP: no bound at all, above any limit
                found.append(f"without differential privacy epsilon is unbounded, above this "
                             f"site's largest, {self.max_epsilon:g} (policy max-epsilon)")
            elif cfg.target_epsilon > self.max_epsilon:
                found.append(f"target epsilon {cfg.target_epsilon:g} is above this site's "
                             f"largest, {self.max_epsilon:g} (policy max-epsilon)")
        if self.tasks and cfg.task not in self.tasks:
            found.append(f"task {cfg.task} is not among this site's allowed tasks "
                         f"({', '.join(self.tasks)})")
        if self.strategies and cfg.strategy not in self.strategies:
            found.append(f"strategy {cfg.strategy} is not among this site's allowed strategies "
                         f"({', '.join(self.strategies)})")
        return found

    def describe(self) -> list[str]:
        """The policy in words, one line per setting."""
        return [
            "differential privacy: " + ("required" if self.require_dp else "not required"),
            "largest target epsilon per run: "
            + (f"{self.max_epsilon:g}" if self.max_epsilon is not None else "no limit"),
            "tasks: " + (", ".join(self.tasks) if self.tasks else "all"),
            "strategies: " + (", ".join(self.strategies) if self.strategies else "all"),
        ]


def _names(value: Any, known: Sequence[str], key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{key} must be a list of names")
    return check_names(value, known, key)
