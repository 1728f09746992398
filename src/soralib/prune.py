"""Count and cut the ranks whose gates the prox step set to zero."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .optim import adapter_of, sora_layers
from .prox import whole


def sparsity_report(model: nn.Module, adapter: str | None = None) -> dict[str, Any]:
    """Per module: r_max, kept rank (non-zero gates) and the kept ranks' exact parameter count.

    A rank costs ``in_features + out_features`` parameters (one row of A, one column of B) in the exported
    LoRA, whatever the layer's shape; `lora_params_at_r_max` is the same count for a plain LoRA of rank r_max.
    """
    adapter = adapter_of(model, adapter)
    modules, kept_params, full_params, kept_rank, r_max_total = [], 0, 0, 0, 0
    for name, layer in sora_layers(model):
        if adapter not in layer.sora_gate:
            continue
        r_max = layer.r_max[adapter]
        # whole: int() of a sharded (FSDP2) count is this rank's part of it, not the sum
        kept = int((whole(layer.sora_gate[adapter]) != 0).sum())
        per_rank = layer.in_features + layer.out_features
        modules.append({"module": _strip(name), "r_max": r_max, "kept_rank": kept, "in_features": layer.in_features,
                        "out_features": layer.out_features, "kept_params": kept * per_rank})
        kept_params += kept * per_rank
        full_params += r_max * per_rank
        kept_rank += kept
        r_max_total += r_max
    if not modules:
        raise ValueError(f"the model has no SoRA layers for adapter {adapter!r}")
    return {
        "modules": modules,
        "kept_rank": kept_rank,
        "r_max_total": r_max_total,
        "kept_params": kept_params,
        "lora_params_at_r_max": full_params,
        "kept_fraction": kept_params / full_params,
    }


def _strip(name: str) -> str:
    """Module path as PEFT patterns see it: without the `base_model.model.` wrapper prefix."""
    return name.removeprefix("base_model.model.")


@torch.no_grad()
def prune(model: nn.Module, adapter: str | None = None) -> dict[str, int]:
    """Cut zero-gated ranks out of A, B and g in place; the model's outputs do not change.

    The kept ranks are written to the adapter config's `kept_ranks`, so a saved pruned adapter loads back
    with its smaller shapes; the adapter gets its own copy of the config first, so the SoraConfig you passed
    (and any other adapter built from it) is left as it was. Returns module path -> kept rank. Build a new
    optimizer afterwards: the pruned parameters are new tensors.
    """
    adapter = adapter_of(model, adapter)
    kept = {}
    for name, layer in sora_layers(model):
        if adapter in layer.sora_gate:
            if layer.merged:
                raise ValueError(f"cannot prune {_strip(name)!r} while merged; unmerge first")
            layer.keep_ranks_(adapter, layer.sora_gate[adapter] != 0)
            kept[_strip(name)] = layer.r[adapter]
    if not kept:
        raise ValueError(f"the model has no SoRA layers for adapter {adapter!r}")
    configs = getattr(model, "peft_config", {})
    if adapter in configs:
        # PEFT keeps the very object given to get_peft_model / add_adapter: the user's, maybe other adapters' too
        configs[adapter] = copy.deepcopy(configs[adapter])
        configs[adapter].kept_ranks = dict(kept)
    return kept
