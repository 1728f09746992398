"""The proximal gate step, added to any torch optimizer.

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
from typing import Any, Iterator

import torch
from torch import nn

from .checks import (GROUP_CHOICES, GROUP_NUMBERS, check_gate_group, check_number, check_optimizer_arguments,
                     check_threshold)
from .layer import CUT_GATES, PROX_GATES, SoraLayer

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


def sora_layers(model: nn.Module) -> Iterator[tuple[str, SoraLayer]]:
    """Every SoRA layer of `model`, with its module path."""
    for name, module in model.named_modules():
        if isinstance(module, SoraLayer):
            yield name, module


def gate_parameters(model: nn.Module, trainable_only: bool = True) -> list[nn.Parameter]:
    """The gate vectors, found through the layers that own them (never by parameter name)."""
    gates = [g for _, layer in sora_layers(model) for g in layer.sora_gate.values()]
    return [g for g in gates if g.requires_grad or not trainable_only]


def adapter_of(model: nn.Module, adapter: str | None) -> str:
    """`adapter`, else the model's active adapter (the first, when several are active)."""
    if adapter is not None:
        return adapter
    active = getattr(model, "active_adapter", "default")
    return active if isinstance(active, str) else active[0]


def gate_l1(model: nn.Module, adapter: str | None = None) -> torch.Tensor:
    """mean |g| over the gates of `adapter` (default: the active one): the reference code's optional extra loss
    term (`loss + c · gate_l1(model)`)."""
    layers = [layer for _, layer in sora_layers(model)]
    if not layers:
        raise ValueError("gate_l1 needs a model with SoRA layers; this one has none")
    adapter = adapter_of(model, adapter)
    gates = [layer.sora_gate[adapter] for layer in layers if adapter in layer.sora_gate]
    if not gates:
        raise ValueError(f"the model has no SoRA layers for adapter {adapter!r}")
    flat = torch.cat([g.reshape(-1) for g in gates])
    return flat.abs().mean() if flat.numel() else flat.sum()  # pruned to nothing: 0, not the mean's NaN


@torch.no_grad()
def prox_step(optimizer: torch.optim.Optimizer) -> None:
    """Soft-threshold every param group that carries a ``sora_threshold``."""
    for group in optimizer.param_groups:
        threshold = group.get("sora_threshold")
        if threshold is None:
            continue
        # float: soft_threshold takes a number, and a Tensor lr (torch allows one) would make τ a tensor
        tau = float(threshold * group["lr"] if group["sora_threshold_mode"] == "lr_scaled" else threshold)
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
            if any(p.ndim != 1 for p in group["params"]):  # the threshold would zero A, B or a head, entry by entry
                raise ValueError(f"{where} holds a parameter of {max(p.ndim for p in group['params'])} dimensions; "
                                 "a gate group holds SoRA gate vectors only (soralib.gate_parameters(model))")
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


def set_threshold(optimizer: torch.optim.Optimizer, threshold: float) -> None:
    """Change ξ (or λ in "lr_scaled" mode) of the gate group(s), e.g. from a schedule."""
    groups = [g for g in optimizer.param_groups if "sora_threshold" in g]
    if not groups:
        raise ValueError("this optimizer has no SoRA gate group; build it with soralib.create_sora_optimizer")
    check_threshold(threshold, groups[0]["sora_threshold_mode"])
    for group in groups:
        group["sora_threshold"] = float(threshold)


def get_threshold(optimizer: torch.optim.Optimizer) -> float:
    for group in optimizer.param_groups:
        if "sora_threshold" in group:
            return group["sora_threshold"]
    raise ValueError("this optimizer has no SoRA gate group; build it with soralib.create_sora_optimizer")


def sora_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, threshold: float = 0.0,
                      threshold_mode: str = "fixed", gate_lr: float | None = None,
                      gate_group_kwargs: dict[str, Any] | None = None, min_rank: int = 0,
                      gate_update: str = "optimizer") -> list[dict[str, Any]]:
    """Param groups: decayed matrices (A, B, head weights), undecayed vectors (biases, norms), gates.

    Gates never get weight decay: the ℓ1 prox step is their only regulariser. With `min_rank` > 0 the
    prox step leaves each module's `min_rank` largest gates alone. `gate_update` "optimizer": the gates take
    the optimizer's own update (AdamW in the reference code); "sgd": plain SGD at the group's lr, whatever
    the optimizer (the paper's proximal gradient step, with ``threshold_mode="lr_scaled"``).
    """
    check_optimizer_arguments(lr, weight_decay, threshold, threshold_mode, gate_lr, gate_group_kwargs, min_rank,
                              gate_update)
    gates = gate_parameters(model)
    if not gates:
        raise ValueError(_why_no_gates(model))
    gate_ids = {id(g) for g in gates}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    groups = [
        {"params": [p for p in others if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in others if p.ndim < 2], "weight_decay": 0.0},
        {"params": gates, "weight_decay": 0.0, "lr": gate_lr or lr, "sora_threshold": float(threshold),
         "sora_threshold_mode": threshold_mode, "sora_min_rank": min_rank, "sora_gate_update": gate_update,
         **(gate_group_kwargs or {})},
    ]
    return [g for g in groups if g["params"]]


def _why_no_gates(model: nn.Module) -> str:
    """Why `model` has no trainable gate: no SoRA layer at all, an adapter loaded for inference, or frozen gates."""
    if not gate_parameters(model, trainable_only=False):
        return "the model has no trainable SoRA gates; wrap it with peft.get_peft_model(model, SoraConfig(...))"
    configs = getattr(model, "peft_config", None) or {}
    # PeftModel.from_pretrained(..., is_trainable=False), the default, sets inference_mode and freezes the adapter
    if any(getattr(c, "inference_mode", False) for c in configs.values()):
        return ("no trainable SoRA gates: the adapter was loaded for inference; load it with "
                "PeftModel.from_pretrained(model, path, is_trainable=True)")
    return "no trainable SoRA gates: every gate has requires_grad=False; unfreeze them or set the adapter active"


def create_sora_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0, threshold: float = 0.0,
                          threshold_mode: str = "fixed", gate_lr: float | None = None,
                          optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                          gate_group_kwargs: dict[str, Any] | None = None, min_rank: int = 0,
                          gate_update: str = "optimizer", **optimizer_kwargs: Any) -> torch.optim.Optimizer:
    """A torch optimizer over the model's trainable parameters, with the prox step on the gate group.

    `gate_update="sgd"` gives the gates plain SGD at their lr before the soft-threshold, whatever
    `optimizer_cls` does to A and B: with ``threshold_mode="lr_scaled"`` the paper's proximal gradient step.

    `gate_group_kwargs` overrides optimizer settings for the gates only, e.g. ``{"eps": 1e-6}`` as in the
    reference code's separate gate AdamW. With transformers' Trainer pass it as
    ``Trainer(..., optimizers=(create_sora_optimizer(model, lr=args.learning_rate, ...), None))``:
    the Trainer then builds its learning-rate schedule on it. Build it after `get_peft_model`, which
    replaces adapter parameters when it casts them.
    """
    groups = sora_param_groups(model, lr, weight_decay, threshold, threshold_mode, gate_lr, gate_group_kwargs,
                               min_rank, gate_update)
    optimizer = optimizer_cls(groups, lr=lr, **optimizer_kwargs)
    unknown = sorted(set(gate_group_kwargs or ()) - set(optimizer.defaults) - {*GROUP_NUMBERS, *GROUP_CHOICES})
    if unknown:  # a torch optimizer keeps a group's unknown keys and ignores them: a typo would do nothing
        raise ValueError(f"gate_group_kwargs key {unknown[0]!r} is not a setting of {optimizer_cls.__name__}; "
                         f"expected one of {', '.join(sorted(optimizer.defaults))}")
    return add_prox_step(optimizer)


class SoraOptimizerFactory:
    """An optimizer factory in transformers' sense: Trainer calls ``SoraOptimizerFactory()(model, **kwargs)``."""

    def __call__(self, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
        return create_sora_optimizer(model, **kwargs)


def trainer_optimizer_cls_and_kwargs(lr: float, **kwargs: Any) -> tuple[type, dict[str, Any]]:
    """The ``Trainer(optimizer_cls_and_kwargs=...)`` form of `create_sora_optimizer`.

    Trainer passes a factory only the kwargs given here, not ``args.learning_rate`` (it would silently
    fall back to the optimizer's default lr), so `lr` is required: pass ``args.learning_rate``. The arguments
    are checked here, not first when the Trainer builds the optimizer.
    """
    check_optimizer_arguments(lr, **kwargs)
    return SoraOptimizerFactory, {"lr": lr, **kwargs}
