"""SoraConfig: the PEFT config of a SoRA adapter, validated at construction."""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils.other import get_pattern_key

GATE_INITS = ("randn", "ones")
BIASES = ("none",)


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

    The adapted layer computes ``h = W0 x + s · B (g ⊙ A x)`` with ``s = lora_alpha / r`` (``lora_alpha / √r``
    with `use_rslora`), where `r` and `lora_alpha` are the module's own: `rank_pattern` / `alpha_pattern`
    override them per module with PEFT LoraConfig's key rules (a key is a regex matched against the end of the
    module path, ``base_model.model.`` left out, after a dot or at the start; the first match in dict order wins).
    The scaling is fixed for the adapter's whole life: pruning ranks away changes shapes, not the scale.
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
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Module key (regex, PEFT LoraConfig's rule) -> r_max of the modules it matches, instead of r."},
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "Module key (regex, PEFT LoraConfig's rule) -> lora_alpha of the modules it matches."},
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "Rank-stabilised scaling s = lora_alpha / sqrt(r_max) instead of lora_alpha / r_max."}
    )
    bias: str = field(
        default="none",
        metadata={"help": "'none' only: SoRA trains no biases (exported adapters stay plain LoRA); train a module's "
                  "bias through modules_to_save."},
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
        if self.bias not in BIASES:
            raise ValueError(f"bias must be 'none' (SoRA trains no biases; put the module in modules_to_save to train "
                             f"its bias), got {self.bias!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be true or false, got {self.use_rslora!r}")
        if not isinstance(self.inference_mode, bool):
            raise ValueError(f"inference_mode must be true or false, got {self.inference_mode!r}")
        self._check_module_names()
        _check_pattern("rank_pattern", self.rank_pattern, _is_rank, "a positive integer")
        _check_pattern("alpha_pattern", self.alpha_pattern, _is_alpha, "a finite number > 0")
        self._check_layers()
        if not isinstance(self.kept_ranks, dict):
            raise ValueError(f"kept_ranks must be a dict of module path -> rank, got {self.kept_ranks!r}")
        for name, rank in self.kept_ranks.items():
            r_max = self.r_max_of(name)
            bound = f"r={r_max}" if r_max == self.r else f"r_max={r_max} (rank_pattern)"
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= r_max:
                raise ValueError(f"kept_ranks[{name!r}] must be an integer in [0, {bound}], got {rank!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    def _check_module_names(self) -> None:
        """The types PEFT LoraConfig takes, which PEFT itself never checks (5 fails deep inside get_peft_model, and a
        string modules_to_save is walked letter by letter)."""
        for name, example in (("target_modules", " (or 'all-linear')"), ("exclude_modules", "")):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)  # PEFT matches a string as one regex against the whole module path
                except re.error as err:
                    raise ValueError(f"{name} {value!r} is not a valid regex ({err}); expected a list of module "
                                     "names or one regex") from None
            elif value is not None and not _is_names(value, (list, tuple, set)):
                raise ValueError(f"{name} must be a list of module names or one regex string{example}, got {value!r}")
        saved = self.modules_to_save
        if isinstance(saved, str):
            raise ValueError(f"modules_to_save must be a list of module names, got {saved!r}; "
                             f"did you mean [{saved!r}]?")
        if saved is not None and not _is_names(saved, (list,)):  # a list: PEFT appends its head names to it
            raise ValueError(f"modules_to_save must be a list of module names, got {saved!r}")

    def _check_layers(self) -> None:
        """PEFT LoraConfig's rules for layers_to_transform / layers_pattern, plus their types."""
        layers = self.layers_to_transform
        if layers is not None and not (_is_index(layers) or isinstance(layers, list) and all(map(_is_index, layers))):
            raise ValueError(f"layers_to_transform must be a layer index >= 0 or a list of them, got {layers!r}")
        pattern = self.layers_pattern
        if pattern is not None and not (isinstance(pattern, str) or isinstance(pattern, list)
                                        and all(isinstance(p, str) for p in pattern)):
            raise ValueError(f"layers_pattern must be a name or a list of names, got {pattern!r}")
        if isinstance(self.target_modules, str) and (layers is not None or pattern is not None):
            raise ValueError("layers_to_transform and layers_pattern need target_modules as a list of names, "
                             f"not one regex; got target_modules={self.target_modules!r}")
        if pattern and layers is None:
            raise ValueError(f"layers_pattern={pattern!r} needs layers_to_transform (the layer indexes to adapt)")

    def r_max_of(self, key: str) -> int:
        """r_max of the module at `key` (its path without ``base_model.model.``): rank_pattern's first match, else r."""
        return self.rank_pattern.get(get_pattern_key(self.rank_pattern.keys(), key), self.r)

    def alpha_of(self, key: str) -> float:
        """lora_alpha of the module at `key`: alpha_pattern's first match, else lora_alpha."""
        return self.alpha_pattern.get(get_pattern_key(self.alpha_pattern.keys(), key), self.lora_alpha)

    def rank_of(self, key: str) -> int:
        """The live rank the module at `key` is built with: its kept rank after pruning, else its r_max."""
        return self.kept_ranks.get(key, self.r_max_of(key))


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_alpha(value) -> bool:
    return _is_number(value) and 0 < value < math.inf


def _is_names(value, kinds: tuple[type, ...]) -> bool:
    return isinstance(value, kinds) and all(isinstance(name, str) for name in value)


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_pattern(name: str, pattern, valid, kind: str) -> None:
    if not isinstance(pattern, dict):
        raise ValueError(f"{name} must be a dict of module key (regex) -> value, got {pattern!r}")
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name} keys must be non-empty module names or regexes, got {key!r}")
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"{name} key {key!r} is not a valid regex ({err})") from None
        if not valid(value):
            raise ValueError(f"{name}[{key!r}] must be {kind}, got {value!r}")


# PEFT builds a SoraConfig's model from its registry, so a SoraConfig must not exist without SoraModel registered:
# importing model.py registers both. Last, because model.py imports SoraConfig from here; when model.py is the
# one imported first, this finds it half-imported and model.py registers once it is done.
from . import model as _model  # noqa: E402,F401
