"""The gate parameters and the optimizers that train them: param groups with a gate group, thresholds read and set.

`create_sora_optimizer` builds any torch optimizer with the gates in a group of their own and adds the prox step
(`soralib.prox`): the threshold lives in that group (``sora_threshold``, ``sora_threshold_mode``).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Iterator

import torch
from torch import nn

from .checks import GROUP_CHOICES, GROUP_NUMBERS, GROUP_TAGS, check_optimizer_arguments, check_threshold
from .layer import SoraLayer
# The prox step's names, public here since before they had a module of their own.
from .prox import add_prox_step, prox_step, soft_threshold  # noqa: F401

logger = logging.getLogger("soralib")


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
    check_min_rank_fits((gate_group_kwargs or {}).get("sora_min_rank", min_rank), gates)
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


def check_min_rank_fits(min_rank: int, gates: list[torch.Tensor]) -> None:
    """A min_rank above every module's r_max spares every gate: no rank could ever be pruned (SoRA as plain LoRA)."""
    top = max(g.numel() for g in gates)
    if min_rank > top:
        raise ValueError(f"min_rank must be <= r_max ({top}: no module has more ranks to keep, so none would ever be "
                         f"pruned), got {min_rank}")


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
    check_gate_group_keys(gate_group_kwargs, optimizer_cls)
    return add_prox_step(optimizer_cls(groups, lr=lr, **optimizer_kwargs))


def check_gate_group_keys(gate_group_kwargs: dict[str, Any] | None, optimizer_cls: type) -> None:
    """Each key is a setting of `optimizer_cls` (its constructor's arguments), soralib's, or a tag: a torch
    optimizer keeps a group's unknown keys and ignores them, so a misspelt setting would silently do nothing."""
    known = set(inspect.signature(optimizer_cls).parameters) - {"params"}
    unknown = sorted(set(gate_group_kwargs or ()) - known - GROUP_TAGS - {*GROUP_NUMBERS, *GROUP_CHOICES})
    if unknown:
        raise ValueError(f"gate_group_kwargs key {unknown[0]!r} is not a setting of {optimizer_cls.__name__}; "
                         f"expected one of {', '.join(sorted(known))}")


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
    check_gate_group_keys(kwargs.get("gate_group_kwargs"), kwargs.get("optimizer_cls", torch.optim.AdamW))
    return SoraOptimizerFactory, {"lr": lr, **kwargs}
