"""PEFT LoRA (optionally with the per-module ranks of a LoraConfig file) and PEFT AdaLoRA, the baselines."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import InputError
from ..rundir import ADAPTER, KEPT_PARAMS, LORA_PARAMS_AT_R_MAX
from .method import Method
from .pretrained import peft_common
from .sora import check_adapter

if TYPE_CHECKING:
    from torch import nn

    from ..config import TrainConfig

PATTERN_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora")


def lora_file(path: str | None) -> dict[str, Any]:
    """The rank-related fields of a LoraConfig JSON (`sora ranks` output), checked; {} without a file."""
    import json

    import peft

    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"lora_config {path} cannot be read as JSON: {err}") from None
    if not isinstance(data, dict):
        raise InputError(f"lora_config {path} must be a JSON object of LoraConfig fields, got {type(data).__name__}")
    fields = {k: data[k] for k in PATTERN_FIELDS if k in data}
    if isinstance(fields.get("target_modules"), list):
        fields["target_modules"] = list(fields["target_modules"])
    try:
        peft.LoraConfig(**fields)
    except (TypeError, ValueError) as err:
        raise InputError(f"lora_config {path}: {str(err).splitlines()[0]}") from None
    return fields


class Lora(Method):
    name = "lora"
    output = "adapter"
    is_adapter = reads_lora_config = True

    def adapt(self, config: TrainConfig, model: nn.Module, total_steps: int, adapter_budget: int | None) -> nn.Module:
        import peft

        fields = dict(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      **peft_common(config, model))
        return peft.get_peft_model(model, peft.LoraConfig(**{**fields, **lora_file(config.lora_config)}))

    def export(self, model: nn.Module, config: TrainConfig, out: Path) -> None:
        from ...io import atomic_dir

        with atomic_dir(out / ADAPTER) as tmp:
            model.save_pretrained(str(tmp))

    def adapter_size(self, config: TrainConfig, model: nn.Module) -> dict[str, Any]:
        """kept_params (in + out per live rank) and the LoRA(r) reference."""
        import peft

        kept = full = 0
        for module in model.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
                cost = module.in_features + module.out_features
                kept += self.live_rank(module) * cost
                full += config.r * cost
        return {KEPT_PARAMS: kept, LORA_PARAMS_AT_R_MAX: full}

    def live_rank(self, module) -> int:
        return getattr(module.lora_A["default"], "weight", module.lora_A["default"]).shape[0]

    def load_result(self, model: nn.Module, run: Path) -> nn.Module:
        from ...verify import load_adapter_safely

        check_adapter(run)
        return load_adapter_safely(model, run / ADAPTER)


class AdaLora(Lora):
    name = "adalora"
    reads_lora_config = False
    supports_budget = reads_target_r = needs_total_steps = True

    def check(self, config: TrainConfig) -> None:
        if config.r < 2:
            raise InputError(f"adalora needs r >= 2 (it prunes from r down to a smaller target), got {config.r}")
        if config.target_rank is not None:
            raise InputError("adalora takes its budget as target_params or adalora_target_r, not target_rank")
        if config.adalora_target_r is not None:
            if config.target_params is not None:
                raise InputError("give target_params or adalora_target_r, not both")
            if config.adalora_target_r > config.r - 1:
                raise InputError(f"adalora_target_r must be <= r - 1 ({config.r - 1}: AdaLoRA prunes from r down "
                                 f"to it), got {config.adalora_target_r!r}")

    def adapt(self, config: TrainConfig, model: nn.Module, total_steps: int, adapter_budget: int | None) -> nn.Module:
        import peft

        if config.r < 2:
            raise InputError(f"adalora needs r >= 2 (it prunes from r down to a smaller target), got {config.r}")
        probe = peft.get_peft_model(model, peft.LoraConfig(r=1, **peft_common(config, model)))  # the targeted shapes
        costs = [m.in_features + m.out_features for m in probe.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
        model = probe.unload()
        if adapter_budget is not None and not sum(costs) <= adapter_budget <= (config.r - 1) * sum(costs):
            # AdaLoRA keeps a mean rank in [1, r - 1]: outside, the budget would be silently missed
            raise InputError(f"target_params must be in [{sum(costs)}, {(config.r - 1) * sum(costs)}] for adalora "
                             f"on this model (mean rank 1 to r - 1 = {config.r - 1} in each of its {len(costs)} "
                             f"adapted modules), got {adapter_budget}")
        # a budget of N parameters is a mean rank of N / Σ(in + out) over the targeted modules
        target_r = config.adalora_target_r or (round(adapter_budget / sum(costs)) if adapter_budget
                                               else max(config.r // 2, 1))
        return peft.get_peft_model(model, peft.AdaLoraConfig(
            # PEFT needs target_r < init_r
            init_r=config.r, target_r=max(1, min(target_r, config.r - 1)), lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout, total_step=total_steps, tinit=int(0.1 * total_steps),
            tfinal=int(0.2 * total_steps), deltaT=max(1, total_steps // 100), **peft_common(config, model)))

    def callbacks(self, config: TrainConfig, guard, budget: tuple[float, str] | None) -> list:
        from ..allocator import AdaLoraAllocator

        return [AdaLoraAllocator(guard)]

    def checkpointing(self, model: nn.Module):
        from ..allocator import every_rank_saved

        return every_rank_saved(model)  # PEFT would cut the adapter down to the ranks kept, losing the others

    def check_checkpoint(self, checkpoint: Path) -> None:
        from ..allocator import check_checkpoint

        check_checkpoint(checkpoint)

    def live_rank(self, module) -> int:
        return int((module.lora_E["default"] != 0).sum())  # AdaLoRA masks ranks by zeroing its singular values E

    def export(self, model: nn.Module, config: TrainConfig, out: Path) -> None:
        # PEFT saves a module whose every rank AdaLoRA masked with 0-sized A and B (and loads it back), then its own
        # check warns that such tensors are ZeRO-3 / FSDP shards never gathered: for those modules, a false alarm.
        import warnings

        import peft

        emptied = sum(1 for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)
                      and "default" in m.lora_A and self.live_rank(m) == 0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            super().export(model, config, out)
        for w in caught:
            if not (emptied and f" {2 * emptied} LoRA tensor(s) have invalid shape" in str(w.message)):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    @contextlib.contextmanager
    def evaluating(self, model: nn.Module):
        # PEFT's AdaLoRA forward adds orth_reg_weight × its orthogonality regulariser to every loss the model
        # returns, in eval mode too; it reads the weight at each call, so 0 leaves the task loss exactly
        config = model.peft_config[model.active_adapter]
        weight, config.orth_reg_weight = config.orth_reg_weight, 0.0
        try:
            yield
        finally:
            config.orth_reg_weight = weight

    def load_result(self, model: nn.Module, run: Path) -> nn.Module:
        import peft

        check_adapter(run)  # verify_adapter knows LoRA and SoRA; AdaLoRA loads as PEFT saved it
        # Merged into a plain model: loaded for inference, AdaLoRA's forward fails on any batch with labels (it
        # adds its regulariser, which needs a trainable adapter), and `evaluating` needs one too
        return peft.PeftModel.from_pretrained(model, str(run / ADAPTER)).merge_and_unload()
