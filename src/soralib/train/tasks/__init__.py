"""What `sora train` learns from: one Task object per kind of data, and the GLUE table.

A Task owns how its model is loaded (a classification head or a language-model head), how rows become
features, the collator, the Trainer class and the metrics; `run.py` asks the run's task object
(`task_of(config.task)`) and never compares task names. Torch and transformers are imported inside the
methods: `sora --help` reads this package and must stay instant.
"""

from __future__ import annotations

from ...errors import InputError
from .glue import GLUE_TASKS, LARGE_TASK_MIN_TRAIN_ROWS, TaskSpec, get_task  # first: custom.py imports them
from .task import ClassificationTask, CustomTask, Task  # noqa: E402
from .sft import SftTask  # noqa: E402

KINDS: dict[str, Task] = {"glue": ClassificationTask(), "custom": CustomTask(), "sft": SftTask()}
TASK_NAMES = (*GLUE_TASKS, "custom", "sft")  # what --task accepts


def task_kind(name: str) -> Task | None:
    """The Task object of a `--task` value, None for an unknown one."""
    if name in KINDS and name != "glue":
        return KINDS[name]
    return KINDS["glue"] if name.lower() in GLUE_TASKS else None


def task_of(name: str) -> Task:
    """The Task object of a `--task` value: "custom", "sft", or a GLUE task (InputError for others)."""
    task = task_kind(name)
    if task is None:
        raise InputError(f"unknown task {name!r}; allowed: {', '.join(TASK_NAMES)}")
    return task


__all__ = ["GLUE_TASKS", "KINDS", "LARGE_TASK_MIN_TRAIN_ROWS", "TASK_NAMES", "ClassificationTask", "CustomTask",
           "SftTask", "Task", "TaskSpec", "get_task", "task_kind", "task_of"]
