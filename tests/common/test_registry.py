"""Tasks, strategies and metric names are declared once (common.registry); every per-task table
and every reader covers exactly what the registry declares (issue 22)."""

import pytest

from common import registry
from common.config import RunConfig
from common.data.card import TASK_NEEDS
from common.registry import STRATEGIES, TASK_MODELS, TASKS, Strategy, Task
from common.training.tasks import TASKS as TRAINERS
from server.model_card import _USES
from server.strategies import build_strategy
from server.tasks import central_task


def test_each_per_task_table_covers_the_registrys_tasks() -> None:
    tables = {
        "common.training.tasks.TASKS": TRAINERS, "common.data.card.TASK_NEEDS": TASK_NEEDS,
        "server.model_card._USES": _USES, "registry.TASK_MODELS": TASK_MODELS,
        "registry.SITE_PLOT_METRIC": registry.SITE_PLOT_METRIC,
    }
    for where, table in tables.items():
        assert set(table) == set(TASKS), where
    for task in TASKS:
        assert TRAINERS[task].name == task
        central_task(task)  # raises for a task it does not know


def test_registry_names_are_the_enums() -> None:
    assert TASKS == tuple(Task) and STRATEGIES == tuple(Strategy)
    assert set(registry.MEAN_STRATEGIES) <= set(STRATEGIES)


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_registered_strategy_builds(name: str) -> None:
    strategy = build_strategy(RunConfig(strategy=name), num_sites=3)
    assert type(strategy).__name__.lower().startswith(name[:6]), (name, type(strategy))


def test_site_metrics_have_a_direction_or_are_declared_neutral() -> None:
    """A metric a site reports is ranked (worst site) unless it is a GAN's balance metric."""
    neutral = {"d-accuracy"}
    ranked = registry.HIGHER_IS_BETTER | registry.LOWER_IS_BETTER
    for task in TRAINERS.values():
        assert task.metrics <= ranked | neutral, (task.name, task.metrics - ranked)
    assert set(registry.SITE_PLOT_METRIC.values()) <= set().union(
        *(t.metrics for t in TRAINERS.values()))
    assert registry.ANOMALY_AUROC in registry.RATE_METRICS
    assert registry.SITE_ANOMALY_AUROC in registry.HIGHER_IS_BETTER
