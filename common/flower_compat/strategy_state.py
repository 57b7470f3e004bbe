"""The arrays a Flower strategy keeps between rounds, read from and written to its attributes.

Flower's strategies have no API to save or restore their state. The optimiser strategies keep
it as attributes holding {name: ndarray}: `FedOpt` (flwr/serverapp/strategy/fedopt.py) sets
`current_arrays` in `configure_train` and the first moment `m_t` in `_compute_deltat_and_mt`;
`FedAdam`, `FedYogi` and `FedAdagrad` add the second moment `v_t` in `aggregate_train`. medfed's
own SCAFFOLD (server/scaffold.py) keeps its control variate `control` the same way. Collecting
every such attribute covers them all without naming Flower's private fields one by one; a resumed
run then continues the optimiser where it stopped (the bias correction reads the round number,
which the recording strategy offsets).

Gate: a resumed run whose optimiser state silently went missing would train differently from the
run it continues, so on a Flower release this was not checked against, checkpoints refuse.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from common.flower_compat import Gate

GATE = Gate(
    patch="saving a strategy's state in checkpoints (FedAdam/FedYogi/FedAdagrad moments)",
    flower_code="flwr/serverapp/strategy/fedopt.py and fedadam.py, fedyogi.py, fedadagrad.py "
                "(the attributes m_t, v_t, current_arrays)",
    test="tests/common/flower_compat/test_strategy_state.py",
)


def strategy_state(strategy: Any) -> dict[str, np.ndarray]:
    """The arrays `strategy` keeps between rounds, as {"attribute/key": array}."""
    GATE.require()
    out: dict[str, np.ndarray] = {}
    for attr, value in vars(strategy).items():
        if isinstance(value, dict) and value and all(
            isinstance(v, np.ndarray) for v in value.values()
        ):
            for key, array in value.items():
                out[f"{attr}/{key}"] = array
    return out


def restore_strategy_state(strategy: Any, state: dict[str, np.ndarray]) -> None:
    """Put arrays saved by `strategy_state` back on `strategy`.

    Raises ValueError when the state names an attribute the strategy lacks (another strategy).
    """
    if state:
        GATE.require()
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for flat, array in state.items():
        attr, key = flat.split("/", 1)
        grouped.setdefault(attr, {})[key] = np.array(array)
    for attr, value in grouped.items():
        if not hasattr(strategy, attr):
            raise ValueError(
                f"checkpoint holds state {attr!r} that strategy {type(strategy).__name__} lacks; "
                "resume with the strategy the run was started with"
            )
        setattr(strategy, attr, value)
