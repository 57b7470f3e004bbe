"""One trainer per `--task`, behind the `Task` interface (client.tasks.base). No Flower here."""

from __future__ import annotations

from client.tasks.autoencode import AutoencodeTask
from client.tasks.base import Fit, Samples, SplitLoader, Task
from client.tasks.classify import ClassifyTask
from client.tasks.segment import SegmentTask
from client.tasks.synthesize import SynthesizeTask

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
