"""The methods compared in one pipeline: SoRA, PEFT LoRA, PEFT AdaLoRA, full fine-tuning, BitFit.

Each method is a way to make a pretrained classifier trainable plus its optimizer, Trainer hooks, export and
reload (a `Method` subclass, one per file); everything else (data, loop, evaluation) is shared, so that
differences in the numbers come from the method alone. REGISTRY is the one place that maps a config's
`method` name to its object: adding a method is its class, an entry below and soralib/configs/NAME.yaml.

Light to import (no torch, peft or transformers): `sora --help` lists the methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import InputError
from .full import BitFit, Full
from .lora import PATTERN_FIELDS, AdaLora, Lora, lora_file
from .method import Method, read_trained
from .pretrained import (BLOCK_LINEARS, HEADS, MINILM_ALIASES, MINILM_HUB_ID, absolute_model, base_model_name, load_base,
                         load_causal_lm, peft_common, resolve_model_path, target_modules, within)
from .sora import Sora, export_layout

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..config import TrainConfig

REGISTRY: dict[str, Method] = {m.name: m for m in (Sora(), Lora(), AdaLora(), Full(), BitFit())}
METHODS = tuple(REGISTRY)  # the shipped methods, each with its soralib/configs/NAME.yaml


def get_method(name: str) -> Method:
    """The method object of `name`; InputError naming the known methods for any other name."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise InputError(f"method must be one of {', '.join(REGISTRY)}, got {name!r}") from None


# The harness's functions of (config, model), kept as the names bench/ and older code call.
def wrap(config: TrainConfig, model: nn.Module, total_steps: int, adapter_budget: int | None = None) -> nn.Module:
    """Make `model` trainable the method's way. `adapter_budget` (parameters) sets AdaLoRA's final rank."""
    return get_method(config.method).wrap(config, model, total_steps, adapter_budget)


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The method's optimizer; for SoRA with the gate group and its prox step, at the first stage's threshold."""
    return get_method(config.method).make_optimizer(config, model)


def adapter_size(config: TrainConfig, model: nn.Module) -> dict[str, Any]:
    """kept_params, lora_params_at_r_max (and for SoRA exported_params): see each method's `adapter_size`."""
    return get_method(config.method).adapter_size(config, model)


__all__ = [
    "BLOCK_LINEARS", "HEADS", "METHODS", "MINILM_ALIASES", "MINILM_HUB_ID", "PATTERN_FIELDS", "REGISTRY", "AdaLora",
    "BitFit", "Full", "Lora", "Method", "Sora", "absolute_model", "adapter_size", "base_model_name", "export_layout", "get_method",
    "load_base", "load_causal_lm", "lora_file", "make_optimizer", "peft_common", "read_trained", "resolve_model_path",
    "target_modules", "within", "wrap",
]
