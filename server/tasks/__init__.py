"""The aggregator's side of each `--task` (server.tasks.base.CentralTask)."""

from __future__ import annotations

from common.registry import Task
from server.tasks.autoencode import AutoencodeCentral
from server.tasks.base import CentralTask, Evaluator, StateDict
from server.tasks.classify import ClassifyCentral
from server.tasks.segment import SegmentCentral
from server.tasks.synthesize import SynthesizeCentral

__all__ = ["CentralTask", "Evaluator", "StateDict", "central_task"]


def central_task(name: str) -> CentralTask:
    """A fresh aggregator side of `--task name` (one per run: it may cache a yardstick)."""
    tasks: dict[str, type[CentralTask]] = {
        Task.classify: ClassifyCentral, Task.segment: SegmentCentral,
        Task.autoencode: AutoencodeCentral, Task.synthesize: SynthesizeCentral,
    }
    if name not in tasks:
        raise ValueError(f"--task must be one of {', '.join(tasks)}, got {name!r}")
    return tasks[name]()
