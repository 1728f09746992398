"""Trim SoRA gates to a parameter budget.

A rank ``j`` of module ``i`` costs ``c_i = in_features + out_features`` parameters (a column of A and a
row of B); the adapter's size is ``Σ_i c_i·|{j : keep_ij}|``. The budget controller of
:mod:`soralib.schedule` only steers the size towards the budget; :func:`trim_model_` after every step of
the hold phase (the last quarter of training) and once at the end guarantees it.
"""

from __future__ import annotations

import torch
from torch import nn

from .optim import shard_like, sora_layers, whole


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
                adapter: str = "default") -> None:
    """Zero, in place, the gates of ``model`` that :func:`trim_to_budget` drops.

    ``measure`` is what ``budget`` counts, as in ``sparsity_report``: "kept_params" (a rank costs
    ``in_features + out_features``) or "kept_rank" (a rank costs 1).
    """
    if measure not in ("kept_params", "kept_rank"):
        raise ValueError(f"measure must be 'kept_params' or 'kept_rank', got {measure!r}")
    layers = [layer for _, layer in sora_layers(model) if adapter in layer.sora_gate]
    gates = [layer.sora_gate[adapter] for layer in layers]
    costs = [layer.in_features + layer.out_features if measure == "kept_params" else 1 for layer in layers]
    # The trim ranks all modules' gates at once: gather sharded (FSDP2) gates whole; every rank computes the
    # same masks and keeps its own shard of them.
    masks = trim_to_budget([whole(g.detach()) for g in gates], costs, int(budget), min_rank)
    apply_masks_(gates, [shard_like(mask, gate) for mask, gate in zip(masks, gates)])
