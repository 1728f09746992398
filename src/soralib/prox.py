"""The proximal gate step, run by the optimizer itself around each ``optimizer.step()``.

SoRA minimises L(A, B, g) + λ‖g‖₁. The gates take a proximal gradient step: the optimizer's own update
(SGD, AdamW, ...), then the soft-threshold

    T_τ(g) = sign(g) · max(|g| − τ, 0)

with τ = ξ ("fixed", the reference code) or τ = η_t · λ ("lr_scaled", the paper's formula, η_t the gate
group's current learning rate). The threshold lives in the gate param group (keys ``sora_threshold`` and
``sora_threshold_mode``), so it is saved by ``optimizer.state_dict()`` and changed by writing the group.
The step is a post-step hook of the optimizer itself: whenever AMP or gradient accumulation skips
``optimizer.step()``, the prox step is skipped with it (a fused optimizer is stepped even then, and skips inside
its kernel: GradScaler's ``found_inf`` on it tells); like torch's optimizers it leaves parameters whose ``.grad``
is None alone.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .checks import check_gate_group, check_number
from .layer import CUT_GATES, PROX_GATES

try:  # FSDP2 shards parameters as DTensors; a torch built without torch.distributed has none
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = ()

logger = logging.getLogger("soralib")

_HOOKED = "_sora_prox_hooked"
_HIDDEN = "_sora_hidden_gate_grads"


def soft_threshold(g: torch.Tensor, tau: float) -> torch.Tensor:
    """T_τ(g) = sign(g) · max(|g| − τ, 0): exactly zero wherever |g| ≤ τ."""
    check_number("tau", tau)  # a negative τ would grow every gate
    return torch.sign(g) * torch.clamp(g.abs() - tau, min=0.0)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded DTensor (FSDP2) gathered on every rank (a collective), else `t`."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (whole, the same on every rank) placed as `like`: each rank takes its own shard, no collective."""
    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)


def tau_per_threshold(group: dict[str, Any]) -> float:
    """τ / sora_threshold for a gate group: its current lr in "lr_scaled" mode (τ = η_t · λ), else 1 (τ = ξ)."""
    return float(group["lr"]) if group["sora_threshold_mode"] == "lr_scaled" else 1.0


@torch.no_grad()
def prox_step(optimizer: torch.optim.Optimizer) -> None:
    """Soft-threshold every param group that carries a ``sora_threshold``."""
    for group in optimizer.param_groups:
        threshold = group.get("sora_threshold")
        if threshold is None:
            continue
        # float: soft_threshold takes a number, and a Tensor lr (torch allows one) would make τ a tensor
        tau = float(threshold * tau_per_threshold(group))
        if tau <= 0:
            continue
        keep = group.get("sora_min_rank", 0)
        for p in group["params"]:
            if p.grad is None:  # not stepped by the optimizer either (e.g. a step skipped for non-finite grads)
                continue
            if keep == 0:  # elementwise: a sharded (FSDP2) gate shrinks shard by shard
                p.copy_(soft_threshold(p, tau))
                continue
            # The ℓ1 penalty spares each module's `keep` largest gates, so no module can vanish; the top-k
            # needs the module's whole gate vector.
            g = whole(p)
            shrunk = soft_threshold(g, tau)
            top = g.abs().topk(min(keep, g.numel())).indices
            shrunk[top] = g[top]
            p.copy_(shard_like(shrunk, p))


def before_step(optimizer: torch.optim.Optimizer) -> None:
    """Refuse to step gates `prune` has cut out of the model; set plain-SGD gates' gradients aside."""
    for group in optimizer.param_groups:
        if "sora_threshold" in group and any(p in CUT_GATES for p in group["params"]):
            raise RuntimeError("this optimizer steps SoRA gates that soralib.prune has replaced: the model no longer "
                               "has them, so its adapter would not train; build a new optimizer after prune "
                               "(soralib.create_sora_optimizer)")
    hide_sgd_gate_grads(optimizer)


def hide_sgd_gate_grads(optimizer: torch.optim.Optimizer) -> None:
    """Before the step: gates of a ``sora_gate_update="sgd"`` group take plain SGD, not the optimizer's own
    update, so their gradients are set aside (an optimizer leaves a parameter without ``.grad`` alone)."""
    hidden = []
    for group in optimizer.param_groups:
        if group.get("sora_gate_update") == "sgd":
            hidden += [(p, group, p.grad) for p in group["params"]]
            for p in group["params"]:
                p.grad = None
    setattr(optimizer, _HIDDEN, hidden)


def amp_skipped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether GradScaler found Inf/NaN gradients for this step of a fused optimizer: it steps such an optimizer
    anyway, with ``found_inf`` set on it, and the fused kernel leaves the parameters alone."""
    found = getattr(optimizer, "found_inf", None)
    return found is not None and bool(found)


@torch.no_grad()
def sgd_gate_step(optimizer: torch.optim.Optimizer, skip: bool = False) -> None:
    """After the step: g ← g − η_t ∇g for the hidden gates, their gradients put back (for the prox step,
    `zero_grad` and anyone reading them): with the prox step, the paper's proximal gradient step. Nothing moves
    on a step GradScaler skipped; gradients it has not unscaled (``grad_scale`` set) are divided by the scale."""
    scale = getattr(optimizer, "grad_scale", None)
    for p, group, grad in getattr(optimizer, _HIDDEN, ()):
        p.grad = grad
        if grad is not None and not skip:
            p.add_(grad if scale is None else grad / torch.as_tensor(scale, device=grad.device), alpha=-group["lr"])
    setattr(optimizer, _HIDDEN, [])


def after_step(optimizer: torch.optim.Optimizer) -> None:
    skip = amp_skipped(optimizer)
    sgd_gate_step(optimizer, skip)
    if not skip:
        prox_step(optimizer)


def add_prox_step(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Run `prox_step` after every `optimizer.step()` (plain-SGD gates first take their step). Idempotent;
    returns the optimizer. Its gate groups (those with a ``sora_threshold``) are checked first."""
    gate_groups = [group for group in optimizer.param_groups if "sora_threshold" in group]
    if not gate_groups:  # soralib never calls it so: the hook would do nothing, and no gate would be pruned
        raise ValueError(f"add_prox_step needs an optimizer with a SoRA gate group (a param group with "
                         f"'sora_threshold'); this {type(optimizer).__name__} has none: build it with "
                         f"soralib.create_sora_optimizer")
    for i, group in enumerate(optimizer.param_groups):
        if "sora_threshold" in group:
            where = f"optimizer.param_groups[{i}]"
            if "sora_threshold_mode" not in group:  # else every step fails, after the optimizer's update
                raise ValueError(f"{where} has 'sora_threshold' but no 'sora_threshold_mode'; expected one of "
                                 "fixed, lr_scaled (soralib.create_sora_optimizer sets both)")
            odd = next((p for p in group["params"] if p.ndim != 1), None)
            if odd is not None:  # the threshold would zero A, B or a head, entry by entry
                raise ValueError(f"{where} holds a parameter of shape {tuple(odd.shape)}; a gate group holds SoRA "
                                 "gate vectors only (soralib.gate_parameters(model))")
            # lr 0 is a schedule's, at a warm-up's first step or a decay's end (a Trainer's when SoraCallback adds
            # the group, or a resumed one's): allowed here, unlike an lr given as an argument
            check_gate_group({k: v for k, v in group.items() if k != "lr"}, where)
            if "lr" in group:
                check_number(f"{where}['lr']", group["lr"])
    for group in gate_groups:  # so that training these gates does not warn they are not thresholded
        for p in group["params"]:
            PROX_GATES[p] = True
    if not getattr(optimizer, _HOOKED, False):
        warn_if_low_precision(gate_groups)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: before_step(opt))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: after_step(opt))
        setattr(optimizer, _HOOKED, True)
    return optimizer


def warn_if_low_precision(gate_groups: list[dict[str, Any]]) -> None:
    """bf16/fp16 gates cannot take the prox step: near 1 bf16 moves in steps of 2^-8 to 2^-7, so a threshold like
    3e-4 rounds away and no rank is ever pruned, silently. Warned, not refused: a large τ still moves them."""
    low = {p.dtype for group in gate_groups for p in group["params"] if p.dtype in (torch.bfloat16, torch.float16)}
    for dtype in sorted(low, key=str):
        logger.warning("SoRA gates are %s: a soft-threshold step smaller than its spacing (%g near 1) rounds away, so "
                       "ranks are not pruned; keep the adapter in float32: cast the base model before "
                       "peft.get_peft_model (PEFT keeps adapter weights float32), not the wrapped model",
                       dtype, torch.finfo(dtype).eps)

