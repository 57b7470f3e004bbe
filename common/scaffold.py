"""SCAFFOLD's control variates travel beside the model, in the same ArrayRecord, under a prefix.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning" (ICML
2020). Each site keeps its own control variate c_i (an estimate of its gradient); the aggregator
keeps c, their mean. Every local step uses g_i(y) - c_i + c, so a site whose data differ from
the federation's (one that holds a single class) follows the federation's gradient instead of
drifting towards its own optimum.

One ArrayRecord per message keeps Flower's strategies' reply checks (exactly one ArrayRecord)
and lets FedAvg average the control updates with the model, weighted the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

# server -> site: c under this prefix; site -> server: c_i's change (delta c_i) under it
CONTROL_PREFIX = "scaffold-control."

T = TypeVar("T")


def split_control(arrays: Mapping[str, T]) -> tuple[dict[str, T], dict[str, T]]:
    """(model entries, control entries with the prefix removed) of one message's arrays."""
    model: dict[str, T] = {}
    control: dict[str, T] = {}
    for name, value in arrays.items():
        if name.startswith(CONTROL_PREFIX):
            control[name[len(CONTROL_PREFIX):]] = value
        else:
            model[name] = value
    return model, control


def with_control(model: Mapping[str, T], control: Mapping[str, T]) -> dict[str, T]:
    """The model's entries followed by the control entries under the prefix."""
    return {**model, **{CONTROL_PREFIX + name: value for name, value in control.items()}}
