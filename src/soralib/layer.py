"""The SoRA layer: a gated low-rank update around a frozen linear layer.

    h = W0 x + s · B (g ⊙ A x),        s = lora_alpha / r_max   (lora_alpha / √r_max with use_rslora)

``A`` (r × in) and ``B`` (out × r) train as in LoRA; the gate ``g`` (length r) is trained by a proximal
step (see `soralib.optim`) that sets whole ranks to exactly zero. The wrapped layer is kept as
``base_layer`` (PEFT's base-layer pattern) and is never changed except by `merge`.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

try:  # GPT-2 style layers store the weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but the math does not need it
    Conv1D = ()

logger = logging.getLogger("soralib")

SUPPORTED_LAYERS = "torch.nn.Linear, transformers Conv1D"
EMBEDDING_ADVICE = "SoRA adapts nn.Linear and Conv1D; for embeddings use peft.LoraConfig or modules_to_save"


# The gates some optimizer soft-thresholds (filled by `soralib.prox.add_prox_step`), weakly held. A plain
# WeakSet cannot hold tensors: its membership test compares them with `==`, which is elementwise.
PROX_GATES = WeakIdKeyDictionary()
# Gates `keep_ranks_` replaced (prune): an optimizer still stepping them steps tensors the model no longer has.
CUT_GATES = WeakIdKeyDictionary()
UNTHRESHOLDED_WARNING = (
    "SoRA gates are not soft-thresholded: this model trains without soralib's prox step, so no rank will ever "
    "be pruned; build the optimizer with soralib.create_sora_optimizer(...) or add "
    "soralib.SoraCallback(threshold=...) to the Trainer's callbacks")


class TrainingCheck:
    """Shared by the SoRA layers of one model, so that the unthresholded-gates warning comes once per model."""

    def __init__(self) -> None:
        self.warned = False


def warn_if_unthresholded(layer: "SoraLayer") -> None:
    """At a layer's first training forward: warn (once per model) if no optimizer soft-thresholds its gates.
    An optimizer is built before the first training step (Trainer builds it before its loop), so a training
    run that goes on without the prox step leaves every rank alive: better loud at the start than silent."""
    gates = [layer.sora_gate[a] for a in layer.active_adapters if a in layer.sora_gate]
    gates = [g for g in gates if g.requires_grad]
    if gates and not layer._sora_check.warned and not any(g in PROX_GATES for g in gates):
        layer._sora_check.warned = True
        logger.warning(UNTHRESHOLDED_WARNING)


def gated_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, gate: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = s · B diag(g) A, shape (out, in)."""
    return scaling * (lora_B * gate) @ lora_A


class SoraLayer(BaseTunerLayer):
    """Adapter state held next to the base layer, one entry per adapter name (PEFT's convention)."""

    adapter_layer_names = ("sora_A", "sora_B", "sora_gate")
    other_param_names = ("r", "r_max", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}  # live rank (shrinks when pruned)
        self.r_max: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict({})
        self.sora_A = nn.ModuleDict({})
        self.sora_B = nn.ModuleDict({})
        self.sora_gate = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self._sora_unchecked = True  # until the first forward in training mode, see `warn_if_unthresholded`
        self._sora_check = TrainingCheck()  # SoraModel gives all its layers one shared check

        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
            self.fan_in_fan_out = False
        elif Conv1D and isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape
            self.fan_in_fan_out = True
        elif isinstance(base, nn.Embedding):
            raise ValueError(f"cannot adapt an nn.Embedding: {EMBEDDING_ADVICE}")
        else:
            raise ValueError(f"cannot adapt a layer of type {type(base).__name__}; allowed: {SUPPORTED_LAYERS}")

    def update_layer(self, adapter_name: str, r_max: int, rank: int, lora_alpha: float, lora_dropout: float,
                     gate_init: str, inference_mode: bool = False, use_rslora: bool = False) -> None:
        """Add adapter `adapter_name` with `rank` live ranks (r_max unless rebuilt after pruning).

        s = lora_alpha / r_max, or lora_alpha / sqrt(r_max) with `use_rslora` (rank-stabilised LoRA)."""
        self.r[adapter_name] = rank
        self.r_max[adapter_name] = r_max
        self.lora_alpha[adapter_name] = lora_alpha
        # The scale is tied to r_max, not the live rank, so that pruning never changes the function.
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r_max) if use_rslora else r_max)
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.sora_A[adapter_name] = nn.Linear(self.in_features, rank, bias=False)
        self.sora_B[adapter_name] = nn.Linear(rank, self.out_features, bias=False)
        self.sora_gate[adapter_name] = nn.Parameter(torch.empty(rank))
        self.reset_parameters(adapter_name, gate_init)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, gate_init: str) -> None:
        # As LoRA: A Kaiming-uniform, B zero, so the adapter starts as the identity update.
        if self.sora_A[adapter_name].weight.numel() == 0:  # a module pruned to rank 0, rebuilt from a save
            return
        nn.init.kaiming_uniform_(self.sora_A[adapter_name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.sora_B[adapter_name].weight)
        gate = self.sora_gate[adapter_name]
        if gate_init == "randn":
            gate.normal_()
        else:
            gate.fill_(1.0)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW in the base layer's own weight layout (transposed for Conv1D)."""
        weight = self.get_base_layer().weight
        delta = gated_delta_weight(
            self.sora_A[adapter].weight.float(), self.sora_B[adapter].weight.float(),
            self.sora_gate[adapter].float(), self.scaling[adapter],
        )
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.to(weight.dtype)

    @torch.no_grad()
    def keep_ranks_(self, adapter: str, keep: torch.Tensor) -> None:
        """Cut the ranks where `keep` is False out of A, B and g; the scaling stays s = lora_alpha / r_max."""
        A, B = self.sora_A[adapter], self.sora_B[adapter]
        gate = self.sora_gate[adapter]
        A.weight = nn.Parameter(A.weight[keep].clone(), requires_grad=A.weight.requires_grad)
        A.out_features = int(keep.sum())
        B.weight = nn.Parameter(B.weight[:, keep].clone(), requires_grad=B.weight.requires_grad)
        B.in_features = int(keep.sum())
        self.sora_gate[adapter] = nn.Parameter(gate[keep].clone(), requires_grad=gate.requires_grad)
        CUT_GATES[gate] = True
        self.r[adapter] = int(keep.sum())


class SoraLinear(nn.Module, SoraLayer):
    """SoRA around an `nn.Linear` or a GPT-2 `Conv1D`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r_max: int, rank: int, lora_alpha: float,
                 lora_dropout: float, gate_init: str, use_rslora: bool = False, **kwargs) -> None:
        super().__init__()
        SoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r_max, rank, lora_alpha, lora_dropout, gate_init, use_rslora=use_rslora)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """W0 ← W0 + ΔW for each adapter, gate included."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.sora_A:
                continue
            base = self.get_base_layer()
            merged = base.weight.data + self.get_delta_weight(adapter)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {adapter!r} gives non-finite weights; the adapter is broken")
            base.weight.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.sora_A:
                self.get_base_layer().weight.data -= self.get_delta_weight(adapter)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._sora_unchecked and self.training and torch.is_grad_enabled():
            self._sora_unchecked = False
            warn_if_unthresholded(self)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.sora_A:
                continue
            A = self.sora_A[adapter]
            h = A(self._cast_input_dtype(self.lora_dropout[adapter](x), A.weight.dtype))
            # s · B(g ⊙ h) computed as B((s·g) ⊙ h): the scale multiplies r numbers instead of a whole
            # (tokens × out) activation, which spares one full-size elementwise pass forward and one backward.
            result = result + self.sora_B[adapter](h * (self.sora_gate[adapter] * self.scaling[adapter])).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "sora." + super().__repr__()
