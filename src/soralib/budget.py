"""Trim SoRA gates to a parameter budget, and the budget policy any training loop can step.

A rank ``j`` of module ``i`` costs ``c_i = in_features + out_features`` parameters (a column of A and a
row of B); the adapter's size is ``Σ_i c_i·|{j : keep_ij}|``. The budget controller of
:mod:`soralib.schedule` only steers the size towards the budget; :func:`trim_model_` after every step of
the hold phase (the last quarter of training) and once at the end guarantees it. `BudgetSchedule` runs
the two: ramp, hold and final trim.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from .optim import adapter_of, get_threshold, set_threshold, sora_layers
from .prox import shard_like, tau_per_threshold, whole
from .prune import sparsity_report
from .schedule import budget_threshold, budget_trajectory

RAMPS = ("threshold", "trim")  # how a budget run gets down to its size (see BudgetSchedule)
# The trim ramp cuts nothing in the first 10 % of training (AdaLoRA's tinit, as `sora train` sets it): gates that
# start equal need steps of their own gradients before their sizes tell them apart.
TRIM_WARMUP = 0.1


def _check(gates: list[torch.Tensor], costs: list[int], budget: float, min_rank: int) -> None:
    if len(gates) != len(costs):
        raise ValueError(f"gates and costs must have the same length, got {len(gates)} gates and {len(costs)} costs")
    for i, (gate, cost) in enumerate(zip(gates, costs)):
        if gate.dim() != 1:
            raise ValueError(f"gates[{i}] must be a 1-D gate vector, got shape {tuple(gate.shape)}")
        if isinstance(cost, bool) or not isinstance(cost, int) or cost <= 0:
            raise ValueError(f"costs[{i}] must be a positive integer (in_features + out_features), got {cost!r}")
    if not budget >= 0:
        raise ValueError(f"budget must be >= 0 parameters, got {budget!r}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 0:
        raise ValueError(f"min_rank must be an integer >= 0, got {min_rank!r}")


def trim_to_budget(gates: list[torch.Tensor], costs: list[int], budget: int, min_rank: int = 0) -> list[torch.Tensor]:
    """Boolean keep-masks, one per gate vector, so that the kept adapter fits in ``budget`` parameters.

    1. Each module keeps its ``min(min_rank, nnz(g_i))`` largest ``|g|`` ranks, whatever they cost.
    2. The other non-zero ranks of all modules, sorted by descending ``|g|`` (ties: module order, then
       rank order), are kept one by one while ``Σ_i c_i·kept_i ≤ budget``; the first rank that would
       overflow the budget ends the trim. The kept set is thus a prefix of the ranking: no rank is kept
       while a larger gate is dropped.

    Zero gates are never kept, so the masks only ever drop ranks. The total exceeds ``budget`` only when
    the ranks forced by ``min_rank`` alone do.

    It runs every step of the budget's hold phase, so it is a handful of tensor ops over all ranks at
    once (one device sync for the finiteness check), never a Python loop over ranks.
    """
    _check(gates, costs, budget, min_rank)
    if not gates:
        return []
    device = gates[0].device
    sizes = [gate.numel() for gate in gates]
    # Integers that int64 tensors hold: a fraction of a rank's cost buys nothing, a huge budget keeps all.
    budget, min_rank = int(min(budget, 2**62)), min(min_rank, max(sizes))
    # float64 holds every fp32/bf16/fp16 gate exactly, so ties stay ties.
    magnitude = torch.cat([gate.detach().abs().to(device, torch.float64) for gate in gates])
    if not bool(torch.isfinite(magnitude).all()):
        i = next(i for i, gate in enumerate(gates) if not bool(torch.isfinite(gate).all()))
        raise ValueError(f"gates[{i}] must be finite, got a NaN or inf")
    module = torch.repeat_interleave(torch.arange(len(gates), device=device), torch.tensor(sizes, device=device))
    cost = torch.tensor(costs, dtype=torch.int64, device=device)[module]
    nonzero = magnitude > 0
    # The stable descending sort ranks all gates; ties keep concatenation order (module, then rank).
    order = torch.argsort(magnitude, descending=True, stable=True)

    # 1. Forced: a rank's place among its module's gates (re-sort the ranking by module, stably).
    by_module = order[torch.argsort(module[order], stable=True)]
    first = torch.tensor([0] + sizes[:-1], device=device).cumsum(0)
    place = torch.empty_like(order)
    place[by_module] = torch.arange(len(order), device=device) - first[module[by_module]]
    forced = nonzero & (place < min_rank)

    # 2. Greedy prefix: costs are positive, so the running total only grows and "keep while it fits"
    # is "keep where the running total fits".
    candidate = (nonzero & ~forced)[order]
    spent = (cost * forced).sum() + torch.where(candidate, cost[order], 0).cumsum(0)
    keep = forced.clone()
    keep[order] |= candidate & (spent <= budget)
    return [mask.to(gate.device) for mask, gate in zip(keep.split(sizes), gates)]


def kept_cost(gates: list[torch.Tensor], costs: list[int]) -> int:
    """Adapter parameters of the non-zero ranks: ``Σ_i c_i·nnz(g_i)``."""
    if len(gates) != len(costs):
        raise ValueError(f"gates and costs must have the same length, got {len(gates)} gates and {len(costs)} costs")
    # whole: int() of a sharded (FSDP2) count is this rank's part of it, not the sum
    return sum(int(torch.count_nonzero(whole(gate))) * cost for gate, cost in zip(gates, costs))


@torch.no_grad()
def apply_masks_(gates: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """Zero, in place, every gate whose mask is False: ``g ← g·[keep]`` (the zeros are +0.0)."""
    if len(gates) != len(masks):
        raise ValueError(f"gates and masks must have the same length, got {len(gates)} gates and {len(masks)} masks")
    for i, (gate, mask) in enumerate(zip(gates, masks)):
        if mask.dtype != torch.bool or mask.shape != gate.shape:
            raise ValueError(
                f"masks[{i}] must be a bool tensor of the gate's shape {tuple(gate.shape)}, "
                f"got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        gate.masked_fill_(~mask.to(gate.device), 0.0)


def trim_model_(model: nn.Module, budget: float, measure: str = "kept_params", min_rank: int = 0,
                adapter: str | None = None) -> None:
    """Zero, in place, the gates of ``model``'s `adapter` (default: the active one, which is the one trained and
    the one `sparsity_report` measures) that :func:`trim_to_budget` drops.

    ``measure`` is what ``budget`` counts, as in ``sparsity_report``: "kept_params" (a rank costs
    ``in_features + out_features``) or "kept_rank" (a rank costs 1).
    """
    if measure not in ("kept_params", "kept_rank"):
        raise ValueError(f"measure must be 'kept_params' or 'kept_rank', got {measure!r}")
    adapter = adapter_of(model, adapter)
    layers = [layer for _, layer in sora_layers(model) if adapter in layer.sora_gate]
    if not layers:  # else nothing is trimmed and the budget silently not kept
        raise ValueError(f"the model has no SoRA layers for adapter {adapter!r}")
    gates = [layer.sora_gate[adapter] for layer in layers]
    costs = [layer.in_features + layer.out_features if measure == "kept_params" else 1 for layer in layers]
    # The trim ranks all modules' gates at once: gather sharded (FSDP2) gates whole; every rank computes the
    # same masks and keeps its own shard of them.
    masks = trim_to_budget([whole(g.detach()) for g in gates], costs, int(budget), min_rank)
    apply_masks_(gates, [shard_like(mask, gate) for mask, gate in zip(masks, gates)])


def steer_to_budget(model: nn.Module, optimizer: Any, budget: float, measure: str, progress: float,
                    min_rank: int = 0, final_fraction: float = 0.75, ramp: str = "threshold") -> None:
    """One step of the budget policy at ``progress`` = step / total steps (see `BudgetSchedule`): before
    ``final_fraction``, the threshold from `budget_threshold` (ramp "threshold") or threshold 0 and `trim_model_`
    to the ramp's size (ramp "trim"); from it on, threshold 0 and `trim_model_` to the budget."""
    if progress >= final_fraction:
        set_threshold(optimizer, 0.0)
        trim_model_(model, budget, measure, min_rank)
        return
    if ramp == "trim":
        set_threshold(optimizer, 0.0)
        report = sparsity_report(model)
        initial = report["r_max_total" if measure == "kept_rank" else "lora_params_at_r_max"]
        start = min(TRIM_WARMUP, final_fraction / 2)
        ramped = final_fraction * max(progress - start, 0.0) / (final_fraction - start)  # the cubic from `start` on
        trim_model_(model, budget_trajectory(initial, min(budget, initial), ramped, final_fraction), measure, min_rank)
        return
    # The controller steers the step's τ, whose floor and cap are set for O(1) gates; in lr_scaled mode the
    # group holds λ = τ / lr (capping λ at 1 capped τ at the lr, and the ramp cut almost nothing).
    per = tau_per_threshold(next(g for g in optimizer.param_groups if "sora_threshold" in g))
    if per <= 0:  # lr 0 (a warm-up's first step, a decay's end): τ = 0 whatever λ, nothing to steer
        return
    report = sparsity_report(model)
    initial = report["r_max_total" if measure == "kept_rank" else "lora_params_at_r_max"]
    tau = budget_threshold(get_threshold(optimizer) * per, report[measure], min(budget, initial), progress,
                           initial=initial, final_fraction=final_fraction)
    set_threshold(optimizer, tau / per)


def _budget_range(report: dict[str, Any], measure: str, min_rank: int, whose: str = "") -> tuple[float, float, str]:
    """(low, high, why): the budgets a run can reach on the model `report` (`sparsity_report`) describes, in
    parameters (measure "kept_params") or mean kept rank per module ("kept_rank"), and why in words. Low is
    `min_rank` ranks in every module, and never under one rank: a smaller budget keeps none, and the run
    would train for nothing. `whose` says where `min_rank` comes from, when not from the caller."""
    modules = report["modules"]
    n, floor = len(modules), [min(min_rank, m["r_max"]) for m in modules]
    costs = [m["in_features"] + m["out_features"] for m in modules]
    floor_text = f"min_rank {min_rank}{whose}" if min_rank else "min_rank 0, yet one rank at least,"
    if measure == "kept_params":
        low = max(sum(k * c for k, c in zip(floor, costs)), min(costs))
        return low, report["lora_params_at_r_max"], f"{floor_text} to r_max ranks in each of its {n} adapted modules"
    return max(sum(floor), 1) / n, report["r_max_total"] / n, f"{floor_text} to the mean r_max of its {n} adapted modules"


def budget_out_of_range(report: dict[str, Any], measure: str, value: float, min_rank: int,
                        whose: str = "") -> str | None:
    """The one-line error for a budget outside `_budget_range`, or None when `value` is in it."""
    low, high, why = _budget_range(report, measure, min_rank, whose)
    if low <= value <= high:
        return None
    name = {"kept_params": "target_params", "kept_rank": "target_rank"}[measure]
    return f"{name} must be in [{_short(low)}, {_short(high)}] for this model ({why}), got {value!r}"


def _short(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and 0 < value < math.inf


def _integer(value: Any, least: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= least


def check_budget(target_params: float | None, target_rank: float | None, min_rank: int,
                 final_fraction: float, ramp: str = "threshold") -> None:
    """`BudgetSchedule`'s settings that need no model, checked before anything is built."""
    if ramp not in RAMPS:
        raise ValueError(f"ramp must be one of {', '.join(RAMPS)}, got {ramp!r}")
    if (target_params is None) == (target_rank is None):
        raise ValueError("give target_params or target_rank, not both" if target_params is not None else
                         "give target_params (adapter parameters) or target_rank (mean rank per module), got neither")
    name, value = ("target_params", target_params) if target_params is not None else ("target_rank", target_rank)
    if not _number(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not _integer(min_rank, 0):
        raise ValueError(f"min_rank must be an integer >= 0, got {min_rank!r}")
    if not _number(final_fraction) or final_fraction > 1:
        raise ValueError(f"final_fraction must be in (0, 1], got {final_fraction!r}")


class BudgetSchedule:
    """Steer a SoRA run to a size budget: the threshold along a ramp down to the budget, then hold the kept
    set at the budget. Any training loop: call `step` after each optimizer step, `finish` after the last.

        optimizer = soralib.create_sora_optimizer(model, lr=8e-4)
        budget = soralib.BudgetSchedule(model, optimizer, target_params=50_000, total_steps=1000)
        for step in range(1, 1001):
            ...; optimizer.step(); scheduler.step(); optimizer.zero_grad()
            budget.step(step)
        budget.finish()   # the guarantee: at most target_params, within one rank

    `target_params` counts adapter parameters (``kept_params`` of `sparsity_report`), `target_rank` the mean
    kept rank per adapted module, of the model's active adapter (the one trained; other adapters are left alone). Every module keeps at least `min_rank` ranks: the trims spare them, and so
    does the prox step of the ramp (the gate group's ``sora_min_rank`` is raised to `min_rank` if lower; if higher,
    e.g. ``create_sora_optimizer(..., min_rank=3)``, it is the floor of the trims and of the budget's range too).

    Ramp (progress p = step / total_steps < f = final_fraction), `ramp="threshold"`: τ from the integral
    controller `budget_threshold`, so the kept size follows AdaLoRA's cubic ramp; every gate shrinks by τ each
    step, so gates that start equal (`gate_init="ones"`) shrink alike and die together, down to `min_rank`.
    `ramp="trim"`: τ = 0 throughout, nothing cut in the first 10 % (`TRIM_WARMUP`; half the ramp if
    final_fraction < 0.2), then after every step only the largest
    gates that fit the cubic ramp's size stay non-zero; the kept gates are not shrunk, so which ranks stay is
    decided by what the gates' own gradients made of them. Hold (p ≥ f): τ = 0 and after every
    step only the largest gates that fit in the budget stay non-zero (`trim_model_`), so the final size is
    the budget to within one rank and the last quarter of training goes to the ranks that are kept, as in
    AdaLoRA's final phase.

    Why not steer to the end: AdamW moves a dead gate by about the lr whatever its gradient, so while the lr
    is above τ dead gates keep reviving, and the live count swings by ±15 % from step to step; when the lr
    decays to 0 they stop reviving and the count fell 10–30 % under the budget (MiniLM, 3 epochs).

    The schedule keeps no state of its own: τ lives in the optimizer's gate group (saved with
    ``optimizer.state_dict()``), so a run resumed from a checkpoint builds a new schedule and goes on exactly.
    """

    def __init__(self, model: nn.Module, optimizer: Any, *, target_params: float | None = None,
                 target_rank: float | None = None, total_steps: int, min_rank: int = 1,
                 final_fraction: float = 0.75, ramp: str = "threshold") -> None:
        check_budget(target_params, target_rank, min_rank, final_fraction, ramp)
        if not _integer(total_steps, 1):
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        get_threshold(optimizer)  # the gate group the schedule steers, or the error that says how to get one
        active = list(dict.fromkeys(a for _, layer in sora_layers(model) for a in layer.active_adapters
                                    if a in layer.sora_gate))
        if len(active) > 1:  # else it measures and trims the first one only
            raise ValueError(f"BudgetSchedule steers one adapter; this model trains {len(active)} at once "
                             f"({', '.join(active)}): give each its own run, or set_adapter to one")
        # The optimizer's own floor holds too: its prox step spares that many gates, and no trim may cut below it.
        group_floor = max(g.get("sora_min_rank", 0) for g in optimizer.param_groups if "sora_threshold" in g)
        whose = ", the optimizer's," if group_floor > min_rank else ""
        min_rank = max(min_rank, group_floor)
        measure = "kept_params" if target_params is not None else "kept_rank"
        value = target_params if target_params is not None else target_rank
        report = sparsity_report(model)
        error = budget_out_of_range(report, measure, value, min_rank, whose)
        if error:
            raise ValueError(error)
        n = len(report["modules"])
        self.budget, self.measure = float(value if measure == "kept_params" else value * n), measure
        self.model, self.optimizer, self.total_steps = model, optimizer, int(total_steps)
        self.min_rank, self.final_fraction, self.ramp = int(min_rank), final_fraction, ramp
        if ramp == "trim":  # from the first step on: the optimizer's own threshold would cut before any trim
            set_threshold(optimizer, 0.0)
        # Else the ramp's prox step could zero a whole module, which no trim brings back.
        for group in optimizer.param_groups:
            if "sora_threshold" in group:
                group["sora_min_rank"] = max(group.get("sora_min_rank", 0), self.min_rank)

    def step(self, global_step: int) -> None:
        """After optimizer step number `global_step` (1 after the first): set τ (ramp) or trim (hold)."""
        if not _integer(global_step, 0):
            raise ValueError(f"global_step must be an integer >= 0, got {global_step!r}")
        steer_to_budget(self.model, self.optimizer, self.budget, self.measure,
                        min(global_step / self.total_steps, 1.0), self.min_rank, self.final_fraction, self.ramp)

    def finish(self) -> None:
        """The final trim: the kept adapter fits the budget (over it only by ranks `min_rank` forces)."""
        trim_model_(self.model, self.budget, self.measure, self.min_rank)
