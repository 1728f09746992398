"""Full fine-tuning and BitFit: the model's own parameters, all of them or the biases (plus the head)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import InputError
from .method import Method
from .pretrained import HEADS, within

if TYPE_CHECKING:
    from torch import nn

    from ..config import TrainConfig


class BitFit(Method):
    name = "bitfit"

    def trains(self, name: str, head: tuple[str, ...]) -> bool:
        return name.endswith(".bias") or within(name, head)

    def adapt(self, config: TrainConfig, model: nn.Module, total_steps: int, adapter_budget: int | None) -> nn.Module:
        head = HEADS + tuple(config.modules_to_save or ())
        chosen = {name for name, _ in model.named_parameters() if self.trains(name, head)}
        if not chosen:  # else the first backward fails, after the run directory is written
            raise InputError(f"--method {self.name}: model {config.model!r} has no bias and no task head to train "
                             "(a Llama-type decoder has no biases); use --method lora or sora")
        for name, param in model.named_parameters():
            param.requires_grad = name in chosen
        return model


class Full(BitFit):
    name = "full"
    trains_all = True

    def trains(self, name: str, head: tuple[str, ...]) -> bool:
        return True
