"""SoRA: a gated LoRA whose gates a proximal step sparsifies; optionally steered to a parameter budget."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import InputError
from ..rundir import ADAPTER, EXPORTED_PARAMS, KEPT_PARAMS, LORA_PARAMS_AT_R_MAX, SORA_ADAPTER, SPARSITY
from .method import Method
from .pretrained import peft_common

if TYPE_CHECKING:
    from torch import nn

    from ..config import TrainConfig

logger = logging.getLogger(__name__)


def export_layout(config: TrainConfig, report: dict[str, Any]) -> str:
    """The layout adapter/ is written in: the configured one, except that a run whose gates all ended at zero
    (a legitimate outcome) gets a rank-1 zero LoRA ("uniform"), since LoRA has no rank 0."""
    return "uniform" if config.layout == "exact" and not report["kept_rank"] else config.layout


class Sora(Method):
    name = "sora"
    output = "adapter"
    is_adapter = gated = supports_schedule = supports_budget = True

    def check(self, config: TrainConfig) -> None:
        if config.deepspeed is not None and (config.effective_min_rank() > 0 or config.target_params
                                             or config.target_rank):
            # ZeRO steps flattened fp32 partitions: no whole gate vector for a topk, and gates zeroed in
            # the model (the budget's trim) come back from the fp32 copy at the next step.
            raise InputError("deepspeed cannot run a parameter budget or min_rank > 0 (ZeRO flattens the gates); "
                             "drop --deepspeed, or the budget and --min-rank")
        # Ranks a SoRA run can never reach: the budget or the floor would be silently missed.
        def bad(name, allowed):
            raise InputError(f"{name} must be {allowed}, got {getattr(config, name)!r}")

        if config.min_rank is not None and config.min_rank > config.r:
            bad("min_rank", f"<= r ({config.r}: a module has no more ranks to keep)")
        if config.target_rank is not None and config.target_rank > config.r:
            bad("target_rank", f"<= r ({config.r}: a module has no more ranks to keep)")
        if config.target_rank is not None and config.target_rank < config.effective_min_rank():
            bad("target_rank", f">= min_rank ({config.effective_min_rank()}: every module keeps that many ranks; "
                               "--min-rank 0 lets modules collapse)")

    def adapt(self, config: TrainConfig, model: nn.Module, total_steps: int, adapter_budget: int | None) -> nn.Module:
        import peft

        import soralib

        if config.threshold_mode == "lr_scaled" and not (config.target_params or config.target_rank
                                                         or config.schedule or config.thresholds):
            # τ = λ·lr each step; a linear decay (and warm-up) averages the lr to about half its peak
            shrink = config.threshold * (config.gate_lr or config.lr) * total_steps / 2
            if shrink < 0.01:
                logger.warning("--threshold-mode lr_scaled reads --threshold %g as λ (τ = λ·lr each step): over %d "
                               "steps the gates shrink by about %.2g in all, which prunes almost nothing; for a "
                               "total shrink z pass --threshold 2·z/(lr·steps) (z = 0.67 keeps about half of "
                               "randn gates)", config.threshold, total_steps, shrink)

        return peft.get_peft_model(model, soralib.SoraConfig(
            r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, gate_init=config.gate_init,
            **peft_common(config, model)))

    def make_optimizer(self, config: TrainConfig, model: nn.Module, threshold: float | None = None):
        """AdamW with the gate group and its prox step, at the first stage's threshold unless `threshold` is given."""
        import soralib

        optimizer = soralib.create_sora_optimizer(
            model, lr=config.lr, weight_decay=config.weight_decay, threshold=config.stage_thresholds()[0],
            threshold_mode=config.threshold_mode, gate_lr=config.gate_lr, gate_update=config.gate_update,
            gate_group_kwargs={} if config.gate_update == "sgd" else {"eps": config.gate_eps},
            min_rank=config.effective_min_rank())
        if threshold is not None:
            soralib.set_threshold(optimizer, threshold)
        return optimizer

    def budget(self, config: TrainConfig, model: nn.Module) -> tuple[float, str] | None:
        """(target, sparsity_report key) of a --target-params / --target-rank run, else None.

        A --target-params the run cannot reach is rejected here, where the per-module cost is first known
        (and before anything is written): below min_rank ranks in every module, or above LoRA at r_max."""
        import soralib
        from soralib.budget import budget_out_of_range

        if config.target_params is None and config.target_rank is None:
            return None
        measure = "kept_params" if config.target_params is not None else "kept_rank"
        value = config.target_params if config.target_params is not None else config.target_rank
        report = soralib.sparsity_report(model)
        error = budget_out_of_range(report, measure, value, config.effective_min_rank())
        if error:
            raise InputError(error)
        return float(value if measure == "kept_params" else value * len(report["modules"])), measure

    def callbacks(self, config: TrainConfig, guard, budget: tuple[float, str] | None) -> list:
        from ..loop import BudgetController

        return [BudgetController(*budget, config.effective_min_rank(), ramp=config.budget_ramp)] if budget else []

    def extra_loss(self, config: TrainConfig, model: nn.Module):
        """The optional ℓ1 gate term c · mean|g|."""
        import soralib

        return config.l1_coef * soralib.gate_l1(model) if config.l1_coef else None

    def log_scalars(self, model: nn.Module, optimizer) -> dict[str, float]:
        import soralib

        report = soralib.sparsity_report(model)
        return {"threshold": soralib.get_threshold(optimizer), "kept_rank": report["kept_rank"],
                "kept_params": report["kept_params"]}

    def export(self, model: nn.Module, config: TrainConfig, out: Path) -> None:
        """sora_adapter/ (the gated form, for `sora export` to other layouts), adapter/ (a plain LoRA) and
        sparsity.json (the kept rank of every module)."""
        import soralib

        from ...io import atomic_dir, atomic_write_json

        with atomic_dir(out / SORA_ADAPTER) as tmp:
            model.save_pretrained(str(tmp))
        layout = export_layout(config, soralib.sparsity_report(model))
        if layout != config.layout:
            logger.warning("every gate ended at zero: adapter/ is a zero LoRA of rank 1 (layout 'uniform') "
                           "beside the trained head")
        soralib.export_lora(model, out / ADAPTER, layout=layout)
        atomic_write_json(out / SPARSITY, soralib.sparsity_report(model))

    def adapter_size(self, config: TrainConfig, model: nn.Module) -> dict[str, Any]:
        """kept_params (in + out per live rank: the adaptive size), the LoRA(r) reference and exported_params,
        what adapter/ stores (layout "uniform" pads every module to the largest kept rank)."""
        import soralib

        report = soralib.sparsity_report(model)
        top = max(max(m["kept_rank"] for m in report["modules"]), 1)  # as export_lora pads
        padded = sum(top * (m["in_features"] + m["out_features"]) for m in report["modules"])
        return {KEPT_PARAMS: report["kept_params"], LORA_PARAMS_AT_R_MAX: report["lora_params_at_r_max"],
                EXPORTED_PARAMS: padded if export_layout(config, report) == "uniform" else report["kept_params"]}

    def load_result(self, model: nn.Module, run: Path) -> nn.Module:
        from ...verify import load_adapter_safely

        check_adapter(run)
        return load_adapter_safely(model, run / ADAPTER)


def check_adapter(run: Path) -> None:
    if not (run / ADAPTER / "adapter_config.json").is_file():
        raise InputError(f"{run} has no finished adapter (adapter/adapter_config.json)")
