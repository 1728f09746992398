"""The rules of a TrainConfig that span fields: fixed choices, fields only some runs read, what each method allows.

Whatever depends on the method asks its object (train/methods) for a property, never its name, so that a new
method states its rules in its own class.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import InputError
from .custom_labels import TASK_TYPES
from .methods import METHODS, REGISTRY, get_method  # noqa: F401 (METHODS: re-exported)
from .tasks import GLUE_TASKS, KINDS, task_kind

if TYPE_CHECKING:
    from .config import TrainConfig

logger = logging.getLogger(__name__)

SCHEDULES = ("linear", "log_linear", "exp_linear")
PROTOCOLS = ("default", "paper")
# Fields with a fixed set of values: validate() checks them and `sora train --help` lists them.
CHOICES = {
    "method": REGISTRY.keys(), "protocol": PROTOCOLS, "schedule": SCHEDULES, "threshold_mode": ("fixed", "lr_scaled"),
    "gate_init": ("randn", "ones"), "gate_update": ("optimizer", "sgd"), "layout": ("exact", "uniform"),
    "chat_template": ("auto", "on", "off"), "budget_ramp": ("threshold", "trim"),
}


def _unset_or(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or test(v)


_AT_LEAST_1, _FINITE = (lambda v: v >= 1), (lambda v: 0 < v < math.inf)
# Numeric fields -> (test, what is allowed): TrainConfig.validate refuses "NAME must be ALLOWED, got VALUE".
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("r", "batch_size", "eval_batch_size", "max_length", "num_stages", "logging_steps",
                     "gradient_accumulation_steps", "max_new_tokens", "max_bad_steps"), (_AT_LEAST_1, "an integer >= 1")),
    **dict.fromkeys(("lr", "lora_alpha", "gate_eps"), (_FINITE, "a finite number > 0")),
    "gate_lr": (_unset_or(_FINITE), "a finite number > 0 (or unset: lr)"),
    **dict.fromkeys(("threshold", "weight_decay", "l1_coef", "max_grad_norm"),
                    (lambda v: 0 <= v < math.inf, "a finite number >= 0")),
    **dict.fromkeys(("warmup_ratio", "lora_dropout"), (lambda v: 0 <= v < 1, "in [0, 1)")),
    **dict.fromkeys(("max_train_samples", "max_eval_samples", "target_params", "adalora_target_r"),
                    (_unset_or(_AT_LEAST_1), "an integer >= 1 (or unset)")),
    "target_rank": (_unset_or(_FINITE), "a finite number > 0 (or unset)"),
    **dict.fromkeys(("save_steps", "memorization_samples", "max_generate_samples"),
                    (lambda v: v >= 0, "an integer >= 0")),
    "min_rank": (_unset_or(lambda v: v >= 0), ">= 0"),
    "eval_fraction": (_unset_or(lambda v: 0 < v < 1), "in (0, 1) (or unset)"),
    "max_steps": (lambda v: v == -1 or v >= 1, "an integer >= 1 (or -1: unset, epochs decide)"),
}


def check_ranges(config: TrainConfig) -> None:
    """InputError for the first field of RANGES outside its range, naming the field, the range and the value."""
    for name, (test, allowed) in RANGES.items():
        if not test(getattr(config, name)):
            raise InputError(f"{name} must be {allowed}, got {getattr(config, name)!r}")


def method_names(has: Callable[[Any], bool]) -> str:
    """The registered methods of which `has(method)` holds, in words: "sora, lora or adalora"."""
    names = [name for name, method in REGISTRY.items() if has(method)]
    return " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


def _with(prop: str) -> tuple[str, str, Callable[[TrainConfig], bool]]:
    """A USED_ONLY condition: the run's method has the Method property `prop`."""
    return "method", f"with method {method_names(lambda m: getattr(m, prop))}", \
        lambda c: getattr(get_method(c.method), prop)


# Fields that only some runs read: field -> [(field the condition is on, "with ..." the run needs, test)].
# A field set for a run that does not read it would be silently ignored: `check_used` rejects it when
# given as a flag; `ignore_unused` resets it when a --config file sets it (warning if not the method's default).
_GATED = _with("gated")
_NO_LIST = ("thresholds", "without --thresholds (the explicit list replaces the schedule)", lambda c: not c.thresholds)


def _task_reads(field: str) -> tuple[str, str, Callable[[TrainConfig], bool]]:
    """A USED_ONLY condition: the run's task reads `field` (Task.fields)."""
    names = [task.label for task in KINDS.values() if field in task.fields]
    text = " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))
    return "task", ("with " if text.startswith("a ") else "with task ") + text, \
        lambda c: field in getattr(task_kind(c.task), "fields", ())


_NO_FILE = ("lora_config", "without --lora-config (the file's value replaces it)", lambda c: c.lora_config is None)
USED_ONLY: dict[str, list[tuple[str, str, Callable[[TrainConfig], bool]]]] = {
    "lora_dropout": [_with("is_adapter")],
    # a --lora-config file's r, lora_alpha and target_modules replace the run's
    **dict.fromkeys(("r", "lora_alpha", "target_modules"), [_with("is_adapter"), _NO_FILE]),
    "modules_to_save": [("method", f"with method {method_names(lambda m: not m.trains_all)} "
                                   f"({method_names(lambda m: m.trains_all)} trains every parameter)",
                         lambda c: not get_method(c.method).trains_all)],
    **dict.fromkeys(("gate_init", "gate_update", "threshold_mode", "gate_lr", "l1_coef", "min_rank",
                     "target_rank", "layout"), [_GATED]),
    "gate_eps": [_GATED, ("gate_update", "with --gate-update optimizer (plain SGD gates have no eps)",
                          lambda c: c.gate_update == "optimizer")],
    "split_seed": [_task_reads("protocol"), ("protocol", "with --protocol paper (the default protocol does not split)",
                    lambda c: c.protocol == "paper")],
    "thresholds": [_with("supports_schedule")],
    "lora_config": [_with("reads_lora_config")],
    "threshold": [_GATED, ("schedule", "without --schedule", lambda c: not c.schedule),
                  ("budget_ramp", "without --budget-ramp trim (it sets no threshold)",
                   lambda c: c.budget_ramp != "trim"),
                  ("thresholds", "without --thresholds (each stage has its own threshold)", lambda c: not c.thresholds)],
    "schedule": [_with("supports_schedule"), _NO_LIST],
    **dict.fromkeys(("schedule_start", "schedule_end", "num_stages"),
                    [_with("supports_schedule"), ("schedule", "with --schedule", lambda c: c.schedule is not None),
                     _NO_LIST]),
    "memorization_samples": [("schedule", "with --schedule or --thresholds (it is measured after each stage)",
                              lambda c: bool(c.schedule or c.thresholds))],
    "target_params": [_with("supports_budget")],
    "budget_ramp": [_GATED, ("target_rank", "with a budget (--target-rank or --target-params)",
                             lambda c: c.target_rank is not None or c.target_params is not None)],
    "adalora_target_r": [_with("reads_target_r")],
    **{field: [_task_reads(field)] for task in KINDS.values() for field in task.fields},
}


def check_combinations(config: TrainConfig) -> None:
    """Fields that exclude each other, and a task_type the task fixes (InputError)."""
    if config.target_params is not None and config.target_rank is not None:
        raise InputError("give target_params or target_rank, not both")
    if (config.target_params is not None or config.target_rank is not None) and (config.schedule or config.thresholds):
        raise InputError("a parameter budget (target_params/target_rank) and a threshold schedule exclude each other")
    if config.deepspeed is not None:
        check_deepspeed_config(config.deepspeed)
    if config.eval_fraction is not None and config.eval_each_epoch:
        raise InputError("give eval_each_epoch or eval_fraction, not both")
    if config.task_type is not None and config.task_type not in TASK_TYPES:
        raise InputError(f"task_type must be one of {', '.join(TASK_TYPES)} (or unset: inferred), "
                         f"got {config.task_type!r}")
    glue = GLUE_TASKS.get(config.task.lower())
    fixed = glue and ("regression" if glue.is_regression else "classification")
    if config.task_type is not None and fixed and config.task_type != fixed:
        raise InputError(f"task {glue.name} is {fixed}: task_type {config.task_type} conflicts with it "
                         "(leave task_type unset)")


def check_method(config: TrainConfig) -> None:
    """The modes the run's method does not support, then the method's own rules (InputError)."""
    method = get_method(config.method)
    if not method.supports_schedule and (config.schedule or config.thresholds):
        raise InputError(f"a threshold schedule needs method {method_names(lambda m: m.supports_schedule)}, "
                         f"got {config.method!r}")
    if not method.supports_budget and (config.target_params or config.target_rank):
        raise InputError(f"a parameter budget needs method {method_names(lambda m: m.supports_budget)}, "
                         f"got {config.method!r}")
    method.check(config)


def unused_reason(config: TrainConfig, name: str) -> str | None:
    """Why `config` never reads field `name` ("is used only with method sora, got method 'lora'"), else None."""
    for key, needs, test in USED_ONLY.get(name, ()):
        if not test(config):
            return f"is used only {needs}, got {key} {getattr(config, key)!r}"
    return None


def ignore_unused(config: TrainConfig, defaults: TrainConfig, from_file: set[str], path: str | None) -> TrainConfig:
    """`config` with each --config file value the run does not read reset to the method's default, with a warning
    when it differed. A saved config.yaml holds every field: reused with another --method or --task, its budget,
    schedule or task fields must neither fail the new run's checks nor be saved as if used. Repeated until
    nothing changes: a reset can leave another field unused (memorization_samples once schedule is gone)."""
    while True:
        unused = {name: unused_reason(config, name) for name in sorted(from_file)
                  if getattr(config, name) != getattr(defaults, name)}
        unused = {name: reason for name, reason in unused.items() if reason}
        if not unused:
            return config
        for name, reason in unused.items():
            logger.warning("%s: %s=%r is ignored: it %s", path, name, getattr(config, name), reason)
        config = dataclasses.replace(config, **{name: getattr(defaults, name) for name in unused})


def check_used(config: TrainConfig, given: set[str]) -> None:
    """Reject a flag the run would ignore (a --config file value it would ignore is reset: `ignore_unused`)."""
    for name in sorted(given):
        reason = unused_reason(config, name)
        if reason:
            raise InputError(f"--{name.replace('_', '-')} {reason}")


def check_deepspeed_config(path: str) -> None:
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"deepspeed config {path} cannot be read as JSON: {err}") from None
    if not isinstance(data, dict):
        raise InputError(f"deepspeed config {path} must be a JSON object, got {type(data).__name__}")
    if "optimizer" in data:
        raise InputError(f"deepspeed config {path} has an \"optimizer\" block: DeepSpeed would build its own "
                         "optimizer and silently drop the SoRA prox step; remove the block")
