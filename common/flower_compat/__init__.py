"""Every place medfed patches or overrides Flower's internals, each behind a version gate.

medfed uses Flower through its public API wherever it can. Where Flower has a bug, or lacks a
hook medfed needs, the change to Flower lives here and nowhere else, one module per change:

| module | what it changes in Flower | why |
|---|---|---|
| `delivery` | the simulation engine's delivery sweep and grid polling | CPU at 1,000 sites |
| `clientapp_runtime` | `run_clientapp`'s pull, install, loader; retries | app approval; speed |
| `supernode_poll` | the SuperNode loop's 3 s and 0.5 s waits; retries | deployed round time |
| `wire` | reads `serde`'s Message and Context protobuf forms | the site worker's hand-over |
| `adaptive_clipping` | the DP wrappers' `_geometric_update` | a sign bug |
| `control_client` | the CLI's `ControlHttpClient.from_server_address` | operator certificate |
| `strategy_state` | reads strategies' attributes (`m_t`, `v_t`, ...) | checkpoints resume them |
| `task_identity` | sets `TaskIdentity` outside a run | Messages built in tests |

Each patch names the Flower versions whose source it was checked against (its `GATE`). On any
other version a patch refuses to run with an error that names the installed version, the Flower
code to re-read and the test that shows whether the patch still holds. The one exception is
`delivery`, a pure speed-up: it warns and leaves Flower's engine as it is.

Flower 1.41.0 is installed (pyproject pins it). 1.42.0 was checked from its wheel: every Flower
file these patches touch or read is byte-identical in the two releases (they differ in 22 files:
agents, tracing, the state schema, the Kubernetes executor's warm pool), and the patches' unit
tests (tests/common/flower_compat/, the central-DP, policy, approval and operator-certificate
tests) pass with the 1.42.0 wheel first on the path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

# The Flower releases whose source every patch below was read against.
CHECKED_VERSIONS = frozenset({"1.41.0", "1.42.0"})


class FlowerVersionError(RuntimeError):
    """The installed Flower is not one a patch was checked against; the message says what to do."""


def installed_version() -> str:
    """The version of the installed `flwr` package."""
    import flwr  # the package's own attribute: tests change it to exercise the gates

    return str(flwr.__version__)


@dataclass(frozen=True)
class Gate:
    """The versions a patch was checked against, and where to look when Flower changes."""

    patch: str  # what medfed changes, as a user reads it
    flower_code: str  # the Flower file and function the patch depends on
    test: str  # the test that fails when the patch no longer holds
    versions: frozenset[str] = CHECKED_VERSIONS

    def holds(self) -> bool:
        """Whether the installed Flower is one this patch was checked against."""
        return installed_version() in self.versions

    def problem(self) -> str:
        """The error text for an installed Flower this patch was not checked against."""
        return (
            f"Flower {installed_version()} is installed, but {self.patch} was checked only "
            f"against Flower {', '.join(sorted(self.versions))}. Install one of those "
            f"(pyproject.toml pins flwr), or re-read {self.flower_code} in the new release, "
            f"run `pytest {self.test}`, and add the version to the gate in "
            "common/flower_compat/ when it passes"
        )

    def require(self) -> None:
        """Raise FlowerVersionError unless the installed Flower is a checked one."""
        if not self.holds():
            raise FlowerVersionError(self.problem())
