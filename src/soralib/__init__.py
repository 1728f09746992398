"""soralib: SoRA (Sparse Low-rank Adaptation) as a PEFT method.

    import soralib, peft
    model = peft.get_peft_model(model, soralib.SoraConfig(r=8, target_modules=["query", "value"]))
    optimizer = soralib.create_sora_optimizer(model, lr=8e-4, threshold=3e-4)
    ...train...
    soralib.export_lora(model, "adapter/")   # a plain PEFT LoRA, smaller rank per module
    lora = soralib.lora_config_from(model)   # or: retrain a plain LoRA from scratch with the ranks SoRA found
"""

from .config import SoraConfig, SoraPeftType
from .export import export_lora
from .layer import SoraLayer, SoraLinear
from .model import SoraModel, register
from .optim import (
    add_prox_step,
    create_sora_optimizer,
    gate_l1,
    gate_parameters,
    get_threshold,
    set_threshold,
    soft_threshold,
    trainer_optimizer_cls_and_kwargs,
)
from .prune import prune, sparsity_report
from .ranks import lora_config_from, rank_pattern
from .verify import load_adapter_safely, verify_adapter

register()

__version__ = "0.1.0"
__all__ = [
    "SoraConfig", "SoraPeftType", "SoraModel", "SoraLayer", "SoraLinear", "register",
    "create_sora_optimizer", "add_prox_step", "set_threshold", "get_threshold", "soft_threshold",
    "trainer_optimizer_cls_and_kwargs", "gate_l1", "gate_parameters",
    "sparsity_report", "prune", "export_lora", "verify_adapter", "load_adapter_safely",
    "rank_pattern", "lora_config_from",
]
