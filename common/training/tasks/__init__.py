"""One trainer per `--task`, behind the `Task` interface (`base.Task`). No Flower here."""

from __future__ import annotations

from common.training.tasks.autoencode import AutoencodeTask
from common.training.tasks.base import Fit, Samples, SplitLoader, Task
from common.training.tasks.classify import ClassifyTask
from common.training.tasks.segment import SegmentTask
from common.training.tasks.synthesize import SynthesizeTask

__all__ = ["TASKS", "Fit", "Samples", "SplitLoader", "Task", "get_task"]

TASKS: dict[str, Task] = {
    task.name: task
    for task in (ClassifyTask(), SegmentTask(), AutoencodeTask(), SynthesizeTask())
}


def get_task(name: str) -> Task:
    """The trainer of `--task name`."""
    if name not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[name]
