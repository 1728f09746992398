"""Full fine-tuning and BitFit: the model's own parameters, all of them or the biases (plus the head)."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
        for name, param in model.named_parameters():
            param.requires_grad = self.trains(name, head)
        return model


class Full(BitFit):
    name = "full"
    trains_all = True

    def trains(self, name: str, head: tuple[str, ...]) -> bool:
        return True
