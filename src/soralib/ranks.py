"""Rank discovery as a product: the rank each module kept, as a plain PEFT LoRA config to train again from scratch.

    lora = soralib.lora_config_from(sora_model)          # after (or during) SoRA training
    model = peft.get_peft_model(fresh_base, lora)         # a plain LoRA with SoRA's per-module ranks

A module's kept rank is its number of non-zero gates (the same before and after `prune`). PEFT LoRA has no
rank 0, so modules whose gates are all zero are left out of `target_modules` and get no adapter.
"""

from __future__ import annotations

import re
from typing import Any

from peft import LoraConfig
from torch import nn

from .config import SoraConfig
from .optim import adapter_of, sora_layers
from .prune import _strip


def exact_key(path: str) -> str:
    """A rank_pattern / alpha_pattern key that selects the module at `path` and no other.

    PEFT matches a key `k` as ``re.match(rf"(.*\\.)?({k})$", path)``: a plain path also matches every longer
    path ending in ``"." + path`` ("0" matches "1.0"), and its dots match any character. ``^`` inside the
    second group can only match at the start, so the optional prefix group must be empty: an exact match.
    """
    return "^" + re.escape(path)


def exact_targets(names, model: nn.Module) -> list[str] | str:
    """`target_modules` that select exactly the modules `names` (paths without ``base_model.model.``).

    PEFT matches list entries as suffixes too: when one name is the tail of another module's path ("0" and
    "1.0"), the names become one regex, which PEFT matches against the whole path.
    """
    names = sorted(names)
    paths = {_strip(n) for n, _ in model.named_modules()}
    ambiguous = any(p != t and p.endswith("." + t) for t in names for p in paths)
    return "|".join(map(re.escape, names)) if ambiguous else names


def sora_config(model: nn.Module, adapter: str) -> SoraConfig:
    """The SoraConfig of `adapter`, or a one-line error naming the adapters the model has."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter not in configs:
        have = ", ".join(configs) if isinstance(configs, dict) else "none (not a PEFT model)"
        raise ValueError(f"no SoRA adapter {adapter!r}; adapters: {have}")
    return configs[adapter]


def kept_ranks(model: nn.Module, adapter: str | None = None) -> dict[str, int]:
    """Module path (PEFT's convention, without ``base_model.model.``) -> number of non-zero gates, 0 included."""
    adapter = adapter_of(model, adapter)
    ranks = {_strip(name): int((layer.sora_gate[adapter] != 0).sum())
             for name, layer in sora_layers(model) if adapter in layer.sora_gate}
    if not ranks:
        raise ValueError(f"the model has no SoRA layers for adapter {adapter!r}")
    return ranks


def rank_pattern(model: nn.Module, adapter: str | None = None) -> dict[str, int]:
    """``peft.LoraConfig(rank_pattern=...)`` giving each module the rank SoRA kept for it.

    Keys select exactly one module each (see `exact_key`). Modules that kept no rank are left out (LoRA has
    no rank 0): target them no more, which `lora_config_from` does for you.
    """
    return {exact_key(path): rank for path, rank in kept_ranks(model, adapter).items() if rank > 0}


def lora_config_from(model: nn.Module, lora_alpha: float | None = None, adapter: str | None = None,
                     **lora_kwargs: Any) -> LoraConfig:
    """A complete `peft.LoraConfig` to train a plain LoRA from scratch with the ranks SoRA kept.

    `target_modules` lists exactly the modules that kept at least one rank; `rank_pattern` gives each its
    kept rank k; `modules_to_save`, `task_type`, `lora_dropout`, `use_rslora` and the base model's name are
    copied from the SoRA config. The alpha of each module (`alpha_pattern`):

    - ``lora_alpha=None`` (default): the ratio the SoRA run used, so LoRA's scale equals the module's SoRA
      scale: alpha = k · lora_alpha / r_max (the module's own lora_alpha and r_max). SoRA's default
      (r=8, lora_alpha=16) thus gives alpha = 2k, LoRA's usual convention. With `use_rslora`, alpha stays
      the module's lora_alpha (rank-stabilised LoRA's convention: alpha does not depend on the rank).
    - a number: every module gets that alpha (LoRA's scale alpha / k then grows as k shrinks).

    `lora_kwargs` set or override any other LoraConfig field (e.g. ``init_lora_weights="pissa"``).
    """
    adapter = adapter_of(model, adapter)
    config = sora_config(model, adapter)
    if lora_alpha is not None and (isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float))
                                   or not 0 < lora_alpha < float("inf")):
        raise ValueError(f"lora_alpha must be a finite number > 0 or None (keep SoRA's ratio), got {lora_alpha!r}")
    layers = {_strip(name): layer for name, layer in sora_layers(model) if adapter in layer.sora_gate}
    ranks = {path: rank for path, rank in kept_ranks(model, adapter).items() if rank > 0}
    if not ranks:
        raise ValueError("every gate is zero: no module kept a rank, so there is no LoRA to train")

    def alpha(path: str) -> float:
        if lora_alpha is not None:
            return lora_alpha
        layer = layers[path]
        if config.use_rslora:
            return layer.lora_alpha[adapter]
        return ranks[path] * layer.lora_alpha[adapter] / layer.r_max[adapter]

    top = max(ranks, key=lambda path: (ranks[path], path))  # r / lora_alpha: any targeted module's; patterns cover all
    fields = dict(
        r=ranks[top], lora_alpha=alpha(top),
        target_modules=exact_targets(ranks, model),
        rank_pattern={exact_key(path): rank for path, rank in sorted(ranks.items())},
        alpha_pattern={exact_key(path): alpha(path) for path in sorted(ranks)},
        # PEFT appends a classifier's head names to the list at every get_peft_model: once each is enough
        modules_to_save=list(dict.fromkeys(config.modules_to_save)) if config.modules_to_save else None,
        task_type=config.task_type,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        fan_in_fan_out=any(layers[path].fan_in_fan_out for path in ranks),
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
    )
    return LoraConfig(**{**fields, **lora_kwargs})
