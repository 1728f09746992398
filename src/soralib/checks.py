"""The checks of the optimizer's, the callback's and the prox step's settings: each bad value is a one-line
ValueError naming the argument, the value and what is allowed, raised before any optimizer is built or changed.
Stdlib only."""

from __future__ import annotations

import math
import numbers
from typing import Any

THRESHOLD_MODES = ("fixed", "lr_scaled")
GATE_UPDATES = ("optimizer", "sgd")


def check_number(name: str, value: Any, least: float = 0, *, above: bool = False, integer: bool = False,
                 none: str = "") -> None:
    """The one check of every numeric setting of the optimizer, the callback and the prox step: a one-line
    ValueError naming `name`, `value` and the allowed range unless `value` is a real number (an integer if
    `integer`; a bool is neither) >= `least` (> with `above`), and finite. None passes when `none` says what it
    stands for."""
    if value is None and none:
        return
    kind = numbers.Integral if integer else numbers.Real
    # comparisons rather than math.isfinite: they reject NaN too, and never overflow on a huge int
    if not (isinstance(value, kind) and not isinstance(value, bool)
            and (least < value if above else least <= value) and value < math.inf):
        allowed = f"{'an integer' if integer else 'a finite number'} {'>' if above else '>='} {least:g}"
        raise ValueError(f"{name} must be {allowed}{f' (or None: {none})' if none else ''}, got {value!r}")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def check_threshold(threshold: float, mode: str) -> None:
    check_choice("threshold_mode", mode, THRESHOLD_MODES)
    check_number("threshold", threshold)


# A gate group's settings that soralib reads (its own and `lr`): checked wherever they come from, by key
GROUP_NUMBERS = {"lr": {"above": True}, "sora_threshold": {}, "sora_min_rank": {"integer": True}}
GROUP_CHOICES = {"sora_threshold_mode": THRESHOLD_MODES, "sora_gate_update": GATE_UPDATES}
# Keys a group may carry for others than its optimizer: a name for loggers (Lightning's LR monitor), a scheduler's.
GROUP_TAGS = {"name", "initial_lr"}


def check_gate_group(group: dict[str, Any], where: str) -> None:
    """The settings of `GROUP_NUMBERS` and `GROUP_CHOICES` that `group` has, each named ``where[key]``; no weight
    decay (the gates' only regulariser is the prox step's ℓ1)."""
    if group.get("weight_decay", 0) != 0:
        raise ValueError(f"{where}['weight_decay'] must be 0 for SoRA gates (the prox step's l1 is their only "
                         f"regulariser), got {group['weight_decay']!r}: set it to 0 (a torch optimizer's default "
                         "applies where the group does not say)")
    for key, value in group.items():
        if key in GROUP_NUMBERS:
            check_number(f"{where}[{key!r}]", value, **GROUP_NUMBERS[key])
        elif key in GROUP_CHOICES:
            check_choice(f"{where}[{key!r}]", value, GROUP_CHOICES[key])


def check_gate_options(threshold: float, threshold_mode: str, gate_lr: float | None, min_rank: int,
                       gate_update: str, gate_group_kwargs: dict[str, Any] | None = None) -> None:
    """The gate group's settings, checked before any optimizer is built or changed."""
    check_threshold(threshold, threshold_mode)
    check_choice("gate_update", gate_update, GATE_UPDATES)
    check_number("min_rank", min_rank, integer=True)
    check_number("gate_lr", gate_lr, above=True, none="lr")
    kwargs = {} if gate_group_kwargs is None else gate_group_kwargs
    if not isinstance(kwargs, dict):
        raise ValueError(f"gate_group_kwargs must be a dict of the gates' optimizer settings, got {kwargs!r}")
    if "params" in kwargs:
        raise ValueError("gate_group_kwargs cannot set 'params': the gate group holds the model's SoRA gates")
    check_gate_group(kwargs, "gate_group_kwargs")  # its settings override the arguments above
    if kwargs.get("sora_gate_update", gate_update) == "sgd":  # the optimizer never steps them: its settings do nothing
        idle = sorted(set(kwargs) - {"lr", "weight_decay", *GROUP_NUMBERS, *GROUP_CHOICES, *GROUP_TAGS})
        if idle:
            raise ValueError(f"gate_group_kwargs key {idle[0]!r} is a setting of the optimizer's own update, which "
                             "gate_update 'sgd' gates do not take (plain SGD at the group's lr): drop it, or use "
                             "gate_update 'optimizer'")


def check_optimizer_arguments(lr: float, weight_decay: float = 0.0, threshold: float = 0.0,
                              threshold_mode: str = "fixed", gate_lr: float | None = None,
                              gate_group_kwargs: dict[str, Any] | None = None, min_rank: int = 0,
                              gate_update: str = "optimizer", **optimizer_kwargs: Any) -> None:
    """`create_sora_optimizer`'s arguments that need no model (`optimizer_kwargs` are the optimizer's own)."""
    check_gate_options(threshold, threshold_mode, gate_lr, min_rank, gate_update, gate_group_kwargs)
    check_number("lr", lr, above=True)
    check_number("weight_decay", weight_decay)
