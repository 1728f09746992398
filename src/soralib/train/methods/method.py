"""`Method`: everything `sora train`, `sora eval` and the config rules need to know about one fine-tuning method.

The harness asks the run's method object (`get_method(config.method)`) instead of comparing names, so a new
method is one subclass plus its registry entry (methods/__init__.py) and its YAML (soralib/configs/NAME.yaml).
The defaults here are those of a method that trains some of the model's own parameters (full, BitFit): it
saves them to model/trainable.safetensors. Torch and peft are imported inside the methods: the registry is
read by `sora --help`, which must stay instant.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import InputError
from ..rundir import KEPT_PARAMS, LORA_PARAMS_AT_R_MAX
from .pretrained import ALL_LINEAR, HEADS

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import TrainerCallback

    from ..config import TrainConfig
    from ..loop import NonFiniteGuard


class Method:
    name: str = ""
    output: str = "model"
    """What the run directory holds: "adapter" (adapter/, a PEFT adapter) or "model" (model/trainable.safetensors)."""
    # What the config rules (train/rules.py) ask: which fields the method reads, which modes it supports.
    is_adapter: bool = False
    """Trains an adapter: reads r, lora_alpha, lora_dropout and target_modules."""
    trains_all: bool = False
    """Trains every parameter: modules_to_save means nothing, modules missing from the checkpoint are saved anyway."""
    gated: bool = False
    """Has SoRA's gates: reads threshold, gate_*, l1_coef, min_rank, target_rank and layout; `sora export` and
    `sora ranks` read its gated adapter (sora_adapter/)."""
    supports_schedule: bool = False
    """Runs the sparsifying scheduler (schedule, thresholds)."""
    supports_budget: bool = False
    """Meets a parameter budget (target_params)."""
    reads_lora_config: bool = False
    """Takes its ranks from a LoraConfig JSON (lora_config)."""
    reads_target_r: bool = False
    """Reads adalora_target_r."""
    needs_total_steps: bool = False
    """Sets its own schedule from the run's step count when the model is wrapped (AdaLoRA's total_step)."""

    def check(self, config: TrainConfig) -> None:
        """Raise InputError for settings this method cannot run (TrainConfig.validate calls it last)."""

    def wrap(self, config: TrainConfig, model: nn.Module, total_steps: int,
             adapter_budget: int | None = None) -> nn.Module:
        """Make `model` trainable the method's way. `adapter_budget` (parameters) sets AdaLoRA's final rank."""
        names = {n for n, _ in model.named_modules()}
        for wanted in config.modules_to_save or []:  # PEFT silently ignores a name that matches nothing
            # HEADS: PEFT adds both to every SEQ_CLS adapter, and configs saved before peft_common copied the
            # list hold them
            if wanted not in HEADS and not any(n == wanted or n.endswith("." + wanted) for n in names):
                raise InputError(f"modules_to_save entry {wanted!r} matches no module of the model")
        if ALL_LINEAR in (config.target_modules or []) and len(config.target_modules) > 1:
            raise InputError(f"target_modules {ALL_LINEAR!r} must be the only entry (it names every linear layer), got "
                             f"{','.join(config.target_modules)}")
        if config.target_modules != [ALL_LINEAR]:  # PEFT ignores an entry that matches nothing while another does
            for wanted in config.target_modules or []:
                if not any(n == wanted or n.endswith("." + wanted) for n in names):
                    from ...model import _closest_names

                    raise InputError(f"target_modules entry {wanted!r} matches no module of the model; "
                                     f"{_closest_names(model, [wanted])}")
        return self.adapt(config, model, total_steps, adapter_budget)

    def adapt(self, config: TrainConfig, model: nn.Module, total_steps: int, adapter_budget: int | None) -> nn.Module:
        """`wrap` after the checks every method shares."""
        raise NotImplementedError

    def make_optimizer(self, config: TrainConfig, model: nn.Module,
                       threshold: float | None = None) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters, without weight decay on vectors. `threshold`: the stage's (SoRA)."""
        import torch

        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW([
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ], lr=config.lr)

    def budget(self, config: TrainConfig, model: nn.Module) -> tuple[float, str] | None:
        """(target, sparsity_report key) the last stage's Trainer steers to, or None."""
        return None

    def callbacks(self, config: TrainConfig, guard: NonFiniteGuard,
                  budget: tuple[float, str] | None) -> list[TrainerCallback]:
        """The method's own Trainer callbacks, after the non-finite guard. `budget`: this stage's, or None."""
        return []

    def extra_loss(self, config: TrainConfig, model: nn.Module) -> torch.Tensor | None:
        """A term added to the task loss at every step, or None."""
        return None

    def evaluating(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """A context in which the loss `model` returns is the task loss alone: a validation loss scores the model,
        not a training-only term of the method. SoraTrainer evaluates within it."""
        return contextlib.nullcontext()

    def checkpointing(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """A context in which Trainer writes a checkpoint's model files (SoraTrainer.save_model): what it saves is
        what training goes on from when the run resumes."""
        return contextlib.nullcontext()

    def check_checkpoint(self, checkpoint: Path) -> None:
        """Raise InputError for a checkpoint of this method that cannot be resumed (before anything is written)."""

    def log_scalars(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Scalars added to every training log line (TensorBoard and history.jsonl)."""
        return {}

    def export(self, model: nn.Module, config: TrainConfig, out: Path) -> None:
        """Write the result into the run directory `out`: here the trained parameters only."""
        from safetensors.torch import save_file

        from ...io import atomic_dir

        with atomic_dir(out / "model") as tmp:
            save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                      str(tmp / "trainable.safetensors"))

    def adapter_size(self, config: TrainConfig, model: nn.Module) -> dict[str, Any]:
        """kept_params (the result's size) and lora_params_at_r_max (the LoRA(r) reference, None without one)."""
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {KEPT_PARAMS: trainable, LORA_PARAMS_AT_R_MAX: None}

    def load_result(self, model: nn.Module, run: Path) -> nn.Module:
        """The base `model` with what `export` wrote into `run` applied (checked to fit and be finite first)."""
        if not (run / "model" / "trainable.safetensors").is_file():
            raise InputError(f"{run} has no finished model (model/trainable.safetensors)")
        model.load_state_dict(read_trained(run, model), strict=False)
        return model


def read_trained(run: Path, model) -> dict:
    """model/trainable.safetensors, refused unless every tensor names a parameter of its shape and is finite."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = run / "model" / "trainable.safetensors"
    try:
        trained = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise InputError(f"{path}: not a valid safetensors file ({' '.join(str(err).split())})") from None
    params = dict(model.named_parameters())
    missing = set(trained) - set(params)
    if missing:
        raise InputError(f"{run}/model does not fit the base model: unknown parameters {sorted(missing)[:3]}")
    for name, tensor in sorted(trained.items()):
        if tensor.shape != params[name].shape:
            raise InputError(f"{run}/model does not fit the base model: {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(params[name].shape)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InputError(f"{path}: tensor {name!r} has NaN or Inf values; expected finite numbers")
    return trained
