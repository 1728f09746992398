"""Put a model back as it was after an in-place change that failed half-way (a PEFT load that raised).

    undo = snapshot(model)
    try:
        wrapped = peft.PeftModel.from_pretrained(model, path)
    except BaseException:
        undo()
        raise

Only the attribute dicts are saved, one level deep, never the weights: O(modules) in time and memory.
"""

from __future__ import annotations

import copy
from typing import Callable

from torch import nn


def snapshot(model: nn.Module) -> Callable[[], None]:
    """A function that puts back what PEFT may change in place: submodules (layers swapped for adapter layers),
    module attributes (peft_config, prepare_inputs_for_generation), requires_grad, and the model config
    (pretraining_tp, tie_word_embeddings). PEFT never writes into the base weights' data."""
    def attributes(obj):  # the containers nn.Module keeps its children, parameters and hooks in, copied one level
        return {k: copy.copy(v) if isinstance(v, (dict, set, list)) else v for k, v in vars(obj).items()}
    objects = list(model.modules())
    objects += [c for c in {id(m.config): m.config for m in objects if hasattr(m, "config")}.values()
                if not isinstance(c, nn.Module) and hasattr(c, "__dict__")]
    saved = [(obj, attributes(obj)) for obj in objects]
    grads = [(p, p.requires_grad) for p in model.parameters()]

    def undo() -> None:
        for obj, attrs in saved:
            vars(obj).clear()
            vars(obj).update(attrs)
        for param, requires_grad in grads:
            param.requires_grad_(requires_grad)
    return undo
