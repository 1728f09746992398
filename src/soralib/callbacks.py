"""SoraCallback: the prox step for a model trained by a plain transformers Trainer (or a Trainer subclass);
SoraBudgetCallback: `soralib.BudgetSchedule` for that Trainer.

A Trainer left to build its own optimizer puts the gates in its AdamW groups: never soft-thresholded (no rank
is ever pruned) and weight-decayed when ``args.weight_decay`` > 0. `SoraCallback` fixes that Trainer's
optimizer at ``on_train_begin``, the first event that sees it (the Trainer builds the optimizer and its
learning-rate schedule in ``train()``, just before): the gates move out of their groups into a gate group of
their own (no weight decay, the ``sora_*`` keys of `soralib.create_sora_optimizer`), the schedule gets an entry
for the new group, and the prox step is added. An optimizer that already has a gate group is left alone.

Resume: ``Trainer.train(resume_from_checkpoint=...)`` builds its optimizer without the gate group and loads
the checkpoint's optimizer and schedule into it before any callback runs. So at ``on_save`` SoraCallback puts
the checkpoint's ``optimizer.pt`` and ``scheduler.pt`` back into the layout the Trainer builds: each gate at
its place in the group it came from, the gate group's settings kept in the first of those groups. On resume
``on_train_begin`` moves the gates out again (their Adam state goes with them) and brings the gate group back
as it was saved: its threshold (as a `soralib.BudgetSchedule` left it) and lr win over the callback's
arguments, as they do when soralib's optimizer is resumed. The run goes on bit for bit.
The same Trainer trained again (a notebook's ``train(resume_from_checkpoint=...)`` after an interruption) keeps
its optimizer, gate group and all: a load hook on it takes the checkpoint's gates back into the gate group.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .budget import BudgetSchedule, check_budget
from .checks import check_gate_options
from .io import atomic_write_bytes
from .optim import _why_no_gates, check_gate_group_keys, check_min_rank_fits, gate_parameters
from .prox import add_prox_step

logger = logging.getLogger(__name__)

FIX = ("pass soralib's optimizer instead: Trainer(..., optimizers=(soralib.create_sora_optimizer(model, "
       "lr=args.learning_rate, threshold=...), None))")
# The Trainer's checkpoint files (transformers.trainer's OPTIMIZER_NAME, SCHEDULER_NAME)
OPTIMIZER_FILE, SCHEDULER_FILE = "optimizer.pt", "scheduler.pt"
# In a checkpoint's optimizer state: the gate group's settings, kept in a group the gates came from
SAVED_GATE_GROUP = "sora_callback_gate_group"
# On an optimizer whose gates SoraCallback moved: where they came from (its `origins`)
MOVED = "_sora_callback_origins"


class SoraCallback(TrainerCallback):
    """Give a Trainer-built optimizer SoRA's gate group and prox step: ``Trainer(..., callbacks=[SoraCallback(
    threshold=3e-4)])``. The arguments are `soralib.create_sora_optimizer`'s; `gate_lr` None: the lr of the
    group the gates came from (``args.learning_rate``), on the Trainer's schedule either way."""

    def __init__(self, threshold: float, threshold_mode: str = "fixed", min_rank: int = 0,
                 gate_lr: float | None = None, gate_update: str = "optimizer",
                 gate_group_kwargs: dict[str, Any] | None = None) -> None:
        check_gate_options(threshold, threshold_mode, gate_lr, min_rank, gate_update, gate_group_kwargs)
        self.gate_group = {"sora_threshold": float(threshold), "sora_threshold_mode": threshold_mode,
                           "sora_min_rank": min_rank, "sora_gate_update": gate_update, **(gate_group_kwargs or {})}
        self.gate_lr = gate_lr
        self.origins: list[tuple[int, int]] | None = None  # (group, position) each gate was moved from

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self.origins = add_gate_group(model, optimizer, lr_scheduler, self.gate_group, self.gate_lr)

    def on_save(self, args, state, control, **kwargs):
        # The Trainer has just written the checkpoint (only where args.should_save); save_only_model,
        # DeepSpeed and FSDP write no optimizer.pt, and an optimizer left alone needs no change.
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self.origins is not None and args.should_save and os.path.isfile(os.path.join(folder, OPTIMIZER_FILE)):
            to_trainer_layout(folder, self.origins)


class SoraBudgetCallback(TrainerCallback):
    """Steer a Trainer's SoRA run to a size budget: ``Trainer(..., callbacks=[soralib.SoraCallback(threshold=0),
    soralib.SoraBudgetCallback(target_params=50_000)])``, or with ``optimizers=(soralib.create_sora_optimizer(
    ...), None)`` and this callback alone. A `soralib.BudgetSchedule` over ``state.max_steps`` is built at
    ``on_train_begin`` (after SoraCallback's, so list that one first), stepped at every ``on_step_end`` and
    finished (the final trim) at ``on_train_end``. The arguments are `BudgetSchedule`'s."""

    def __init__(self, target_params: float | None = None, target_rank: float | None = None, min_rank: int = 1,
                 final_fraction: float = 0.75, ramp: str = "threshold") -> None:
        check_budget(target_params, target_rank, min_rank, final_fraction, ramp)
        self.settings = {"target_params": target_params, "target_rank": target_rank, "min_rank": min_rank,
                         "final_fraction": final_fraction, "ramp": ramp}
        self.schedule: BudgetSchedule | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        model = getattr(model, "module", model)  # DDP's wrapper
        if not any("sora_threshold" in group for group in optimizer.param_groups):
            raise ValueError("SoraBudgetCallback found no SoRA gate group in the Trainer's optimizer; list "
                             "soralib.SoraCallback(threshold=...) before it in callbacks, or pass "
                             "optimizers=(soralib.create_sora_optimizer(model, lr=args.learning_rate), None)")
        self.schedule = BudgetSchedule(model, optimizer, total_steps=state.max_steps, **self.settings)

    def on_step_end(self, args, state, control, **kwargs):
        self.schedule.step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.schedule.finish()  # also after load_best_model_at_end, which may bring back a larger adapter


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper (whose ``step`` calls it, so its hooks run)."""
    from accelerate.optimizer import AcceleratedOptimizer  # a dependency of transformers' Trainer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):  # DeepSpeed's, SageMaker's: param groups not torch's
        raise ValueError(f"SoraCallback cannot add the prox step to a {type(optimizer).__name__}; {FIX}")
    if type(optimizer).__module__.startswith("bitsandbytes"):  # its state is laid out per parameter at creation
        raise ValueError(f"SoraCallback cannot move the gates of a bitsandbytes {type(optimizer).__name__}; {FIX}")
    return optimizer


def add_gate_group(model: torch.nn.Module, optimizer: Any, scheduler: Any, gate_group: dict[str, Any],
                   gate_lr: float | None) -> list[tuple[int, int]] | None:
    """Move the gates of `model` out of `optimizer`'s groups into a gate group, extend `scheduler` to it and
    add the prox step; return where each gate was: (group, position), in the gate group's order (None: the
    optimizer had a gate group of its own and was left alone; one whose gates were moved here before gives
    their places again). A group holding a `SAVED_GATE_GROUP` (a checkpoint saved by SoraCallback was loaded)
    gives the gate group's settings instead of `gate_group` and `gate_lr`.
    Everything is checked before anything changes. The optimizer state of each gate stays (torch keys it by
    parameter, not by group)."""
    gates = gate_parameters(model)
    if not gates:
        raise ValueError(_why_no_gates(model))
    opt = torch_optimizer(optimizer)
    check_gate_group_keys(gate_group, type(opt))  # the Trainer's optimizer class is known only now
    check_min_rank_fits(gate_group["sora_min_rank"], gates)
    if any("sora_threshold" in group for group in opt.param_groups):
        moved = getattr(opt, MOVED, None)  # the same Trainer trains again and kept its optimizer
        if moved is not None and scheduler is not None and len(scheduler.base_lrs) < len(opt.param_groups):
            # it resumed: the checkpoint's schedule, in the Trainer's layout, left the gate group no entry
            scheduler.base_lrs.append(opt.param_groups[-1]["initial_lr"])
        add_prox_step(opt)  # soralib's optimizer (or its groups): keep its threshold; the hook is idempotent
        return moved
    gate_ids = {id(g) for g in gates}
    sources = [i for i, group in enumerate(opt.param_groups) if any(id(p) in gate_ids for p in group["params"])]
    found = sum(id(p) in gate_ids for group in opt.param_groups for p in group["params"])
    if found != len(gates):  # layer-wise or LOMO optimizers, FSDP1's flat parameters, or gates left out on purpose
        raise ValueError(f"{len(gates) - found} of the model's {len(gates)} trainable SoRA gates are not in the "
                         f"Trainer's optimizer, so SoraCallback cannot threshold them; {FIX}")
    if scheduler is not None and not isinstance(scheduler, LambdaLR):
        raise ValueError(f"SoraCallback cannot extend a {type(scheduler).__name__} learning-rate schedule to "
                         f"the gate group; {FIX}")

    where = {id(p): (i, at) for i, group in enumerate(opt.param_groups) for at, p in enumerate(group["params"])}
    origins = [where[id(g)] for g in gates]
    source = opt.param_groups[sources[0]]
    saved = next((group.pop(SAVED_GATE_GROUP) for group in opt.param_groups if SAVED_GATE_GROUP in group), None)
    if saved is not None:  # resumed: the group as it was saved (threshold, lr at the saved step, ...)
        new_group = {**saved, "params": gates}
    else:
        base_lr = gate_lr or source.get("initial_lr", source["lr"])
        factor = scheduler.lr_lambdas[sources[0]](scheduler.last_epoch) if scheduler is not None else 1.0
        settings = {k: v for k, v in source.items() if k != "params"}  # betas, eps, fused, ... as the gates had
        new_group = {**settings, "params": gates, "weight_decay": 0.0, "lr": base_lr * factor,
                     "initial_lr": base_lr, **gate_group}
    for group in opt.param_groups:  # an emptied group stays, so that the schedule's entries keep their places
        group["params"] = [p for p in group["params"] if id(p) not in gate_ids]
    opt.add_param_group(new_group)
    if scheduler is not None:
        scheduler.lr_lambdas.append(scheduler.lr_lambdas[sources[0]])
        scheduler.base_lrs.append(new_group["initial_lr"])
    add_prox_step(opt)
    # A Trainer keeps its optimizer for its next train(): one resumed from a checkpoint loads it into this layout
    setattr(opt, MOVED, origins)
    opt.register_load_state_dict_pre_hook(lambda _, state: from_trainer_layout(state, origins))
    logger.info("SoraCallback: %d gates moved into a gate group (threshold %g, %s%s)", len(gates),
                new_group["sora_threshold"], new_group["sora_threshold_mode"],
                ", as saved in the checkpoint" if saved is not None else "")
    return origins


def to_trainer_layout(folder: str, origins: list[tuple[int, int]]) -> None:
    """Rewrite a checkpoint's optimizer.pt and scheduler.pt, saved with the gate group `add_gate_group` added,
    in the layout of the optimizer the Trainer builds: each gate back at its `origins` place, the gate group
    gone (its settings kept under `SAVED_GATE_GROUP` in the first group a gate came from), one schedule entry
    fewer. Each file is replaced atomically; one in another layout is left as it is."""
    path = os.path.join(folder, OPTIMIZER_FILE)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    *groups, gate_group = saved["param_groups"]
    if "sora_threshold" not in gate_group or len(gate_group["params"]) != len(origins):
        logger.warning("SoraCallback: %s has no gate group of %d gates last; left as it is", path, len(origins))
        return
    # torch numbers the parameters consecutively over the groups: put the gates' numbers back in place
    # (in ascending positions, so each lands where it was), then number them anew in that order.
    order = [list(group["params"]) for group in groups]
    for (i, at), index in sorted(zip(origins, gate_group["params"])):
        order[i].insert(at, index)
    renumber = {old: new for new, old in enumerate(index for params in order for index in params)}
    first = min(i for i, _ in origins)
    saved["param_groups"] = [{**group, "params": [renumber[index] for index in params]} for group, params in
                             zip(groups, order)]
    saved["param_groups"][first][SAVED_GATE_GROUP] = {k: v for k, v in gate_group.items() if k != "params"}
    saved["state"] = {renumber[index]: value for index, value in saved["state"].items()}
    _save_atomically(saved, path)

    path = os.path.join(folder, SCHEDULER_FILE)
    if os.path.isfile(path):
        schedule = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("base_lrs", "_last_lr", "lr_lambdas"):  # LambdaLR's entries per group
            if len(schedule.get(key, ())) == len(groups) + 1:
                schedule[key] = schedule[key][:len(groups)]
        _save_atomically(schedule, path)


def from_trainer_layout(state: dict[str, Any], origins: list[tuple[int, int]]) -> dict[str, Any] | None:
    """The inverse of `to_trainer_layout` for an optimizer state about to be loaded into an optimizer whose gates
    were moved (a Trainer's second train() keeps its optimizer): the gates taken from their `origins` places into
    the gate group, appended last with the saved settings. None (load as it is) for a state without them."""
    groups = state["param_groups"]
    saved = next((group[SAVED_GATE_GROUP] for group in groups if SAVED_GATE_GROUP in group), None)
    if saved is None:
        return None
    moved = set(origins)  # torch matches saved ids to parameters by their order, so no renumbering is needed
    kept = [{**{k: v for k, v in group.items() if k != SAVED_GATE_GROUP},
             "params": [index for at, index in enumerate(group["params"]) if (i, at) not in moved]}
            for i, group in enumerate(groups)]
    gate_group = {**saved, "params": [groups[i]["params"][at] for i, at in origins]}
    return {**state, "param_groups": kept + [gate_group]}


def _save_atomically(obj: Any, path: str) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
