"""SoraConfig: the PEFT config of a SoRA adapter, validated at construction."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

GATE_INITS = ("randn", "ones")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class SoraPeftType(str, enum.Enum):
    """PEFT's `PeftType` is a closed enum; SoRA brings its own member with the same shape.

    It must be a `str` enum: transformers reads `peft_type.value`, and PEFT compares it with strings.
    """

    SORA = "SORA"


@dataclass
class SoraConfig(PeftConfig):
    """Configuration of a SoRA adapter: a LoRA of rank `r` (r_max) with a gate between A and B.

    The adapted layer computes ``h = W0 x + (lora_alpha / r) · B (g ⊙ A x)``. The scaling is fixed at
    ``lora_alpha / r`` for the adapter's whole life: pruning ranks away changes shapes, not the scale.
    """

    r: int = field(default=8, metadata={"help": "r_max: the rank each module starts with, before gates prune it."})
    lora_alpha: float = field(default=16, metadata={"help": "Scaling numerator: s = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input, in [0, 1)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or one regex to adapt. None: PEFT's LoRA defaults for the "
            "architecture; 'all-linear': every linear layer but the output head."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or one regex to leave alone (PEFT semantics)."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter, e.g. the task head."}
    )
    gate_init: Literal["randn", "ones"] = field(
        default="randn",
        metadata={"help": "'randn': g ~ N(0, 1) as in the reference code; 'ones': g = 1, so SoRA starts as LoRA."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indexes (PEFT semantics)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, with layers_to_transform (PEFT semantics)."}
    )
    kept_ranks: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "Written by soralib.prune: module path -> rank left after cutting zeroed gates, so that a "
            "saved pruned adapter is rebuilt with its smaller shapes. Not a user setting."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SoraPeftType.SORA
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer (r_max), got {self.r!r}")
        if not _is_number(self.lora_alpha) or not 0 < self.lora_alpha < math.inf:
            raise ValueError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.gate_init not in GATE_INITS:
            raise ValueError(f"gate_init must be one of {', '.join(GATE_INITS)}, got {self.gate_init!r}")
        if not isinstance(self.kept_ranks, dict):
            raise ValueError(f"kept_ranks must be a dict of module path -> rank, got {self.kept_ranks!r}")
        for name, rank in self.kept_ranks.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= self.r:
                raise ValueError(f"kept_ranks[{name!r}] must be an integer in [0, r={self.r}], got {rank!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
