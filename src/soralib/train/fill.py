"""What TrainConfig.validate fills in: the fields left unset that follow from others, and local paths made absolute.

A run directory must work from any current directory: `sora eval`, `export`, `ranks` and `--resume` read the
paths back from its config.yaml wherever they run, so a relative `--data-dir glue` kept as typed would name
another folder there, or none. The output directory is kept as given: no command reads it back from config.yaml
(`--resume` takes the one it is given), and the lines that name it show what the user typed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import TrainConfig

PATH_FIELDS = ("data_dir", "train_file", "validation_file", "lora_config", "deepspeed")  # local files or folders


def fill_in(config: TrainConfig) -> TrainConfig:
    """`config` with max_length set from its task when unset and its local paths absolute (in place; returned).

    A resume asks it which values the user did not choose (resume.changed_settings): whatever it fills in must
    depend on the other fields alone, so that a bare `sora train --output-dir DIR --resume` fills in the same."""
    from .tasks import task_of

    if config.max_length is None:  # the task's own length (config.yaml holds the number)
        config.max_length = task_of(config.task).max_length if config.task else 128
    return absolute_paths(config)


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """`config` with its local paths absolute (in place; returned): the model when it names a local path, and
    PATH_FIELDS."""
    from .methods import absolute_model

    config.model = absolute_model(config.model)
    for name in PATH_FIELDS:
        if getattr(config, name):
            setattr(config, name, absolute(getattr(config, name)))
    return config


def absolute(path: str) -> str:
    """`path` from the current directory, "~" expanded; an absolute path exactly as given (not normalised)."""
    local = os.path.expanduser(path)
    return local if os.path.isabs(local) else os.path.abspath(local)
