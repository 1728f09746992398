"""Check an adapter directory from an untrusted source before any of it reaches a model.

    config = soralib.verify_adapter(base_model, "adapter/", expected_base="bert-base-uncased")
    model = soralib.load_adapter_safely(base_model, "adapter/")
    soralib.load_adapter_safely(model, "other/", adapter_name="other")   # a second adapter into the same PeftModel

Everything is read as data: the config with `json`, the weights with `safetensors` (the header first, for
keys, shapes and dtypes; then tensor by tensor, for NaN and Inf). A pickle is never opened. The expected
key -> shape map is computed from the base model's modules and the config, with PEFT's own matching rules,
so whatever passes is exactly what `peft.PeftModel.from_pretrained` will load. The base model is only read.

This module matches the adapter to the model (task type, target modules, scales, the weights' keys, shapes and
values); reading the directory's files and its config on their own is `adapter_dir.py`'s part.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path

import peft
import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open
from torch import nn

# The names that moved to adapter_dir stay importable from here, where they were first.
from .adapter_dir import (CONFIG_NAME, FIELD_TYPES, LORA_FIELDS, MAX_DEPTH, MAX_RANK, PEFT_TYPES,  # noqa: F401
                          PICKLE_SUFFIXES, WEIGHTS_NAME, _one_line, _short, logger, read_adapter_config)
from .errors import InputError
from .layer import Conv1D
from .model import _closest_names
from .undo import snapshot

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
PREFIX = "base_model.model."
# A scale lora_alpha / r (or / sqrt(r), rsLoRA) larger than this in size is refused. Published recipes stay below
# ~1e2 (alpha = 2r gives 2; rsLoRA with alpha 16..256 a few dozen), so 1e4 leaves two orders of headroom; yet at 1e4
# ordinary entries (|A|, |B| ~ 0.1) already make s * B @ A hundreds of times the base weights (~0.05), a short step
# from float16's 65504. A larger scale comes from a broken or hostile file, not from training.
MAX_SCALE = 1e4
# An adapter factor's entries are O(1) after training (A starts at ~1/sqrt(in), B at 0, gates at ~1); at 1e4 in
# both A and B one rank already adds 1e8 * scale per input unit, NaN in float16 and junk in float32: refused.
MAX_WEIGHT = 1e4
# The heads PEFT's PeftModelFor<task> adds to modules_to_save when it loads an adapter of that task_type.
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
PEFT_CLASS_TASK = (("PeftModelForSequenceClassification", "SEQ_CLS"), ("PeftModelForTokenClassification", "TOKEN_CLS"),
                   ("PeftModelForQuestionAnswering", "QUESTION_ANS"))
# Which PEFT task_type fits a transformers model, by its class name in transformers' auto mappings.
TASK_MAPPINGS = {"SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                 "CAUSAL_LM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                 "SEQ_2_SEQ_LM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
                 "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
                 "QUESTION_ANS": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
                 "FEATURE_EXTRACTION": "MODEL_MAPPING_NAMES"}


def verify_adapter(base_model: nn.Module, adapter_dir: str | os.PathLike, expected_base: str | None = None
                   ) -> peft.PeftConfig:
    """Check `adapter_dir` against `base_model` and return its parsed config; raise `InputError` if anything is off.

    Checked: the files (adapter_config.json and adapter_model.safetensors present; no pickle-only weights),
    the config (valid JSON without NaN/Infinity, at most MAX_DEPTH levels deep, peft_type LORA or SORA, known
    fields, the base model named `expected_base` when both are set, a task_type that fits the base model, every
    target_modules entry matching a Linear/Conv1D module, finite lora_alpha and alpha_pattern values, ranks up to
    MAX_RANK, and a scale lora_alpha / r (rsLoRA: / sqrt(r)) of at most MAX_SCALE in size for every adapted
    module), and the weights (a parseable safetensors file with exactly the expected keys and shapes, float
    dtypes, finite values).

    `base_model` may already be a PeftModel (to add a second adapter): the adapter is checked against its base
    model, the modules that earlier adapters wrap counted as the layers they wrap.

    Pickle files (*.bin, *.pt, *.pth, *.pkl, *.ckpt) are refused when there is no adapter_model.safetensors:
    unpickling can run arbitrary code. When the safetensors file is there too, the pickles are ignored with a
    logged warning: PEFT loads adapter_model.safetensors first and never opens them.
    """
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    config = read_adapter_config(adapter_dir, expected_base)
    task = getattr(config.task_type, "value", config.task_type)
    if isinstance(base_model, peft.PeftModel):
        held, new = (getattr(t, "value", t) for t in (base_model.peft_type, config.peft_type))
        if new != held:  # PEFT refuses to mix types in one model, after it has started to change it
            raise InputError(f"{config_path}: peft_type is {new!r} and the model's adapters are "
                             f"{held!r}; expected {held!r}, or load it into a base model without adapters")
        # a further adapter gets the heads of the PeftModel it joins, whatever its own task_type
        task = next((t for cls, t in PEFT_CLASS_TASK if isinstance(base_model, getattr(peft, cls))), None)
        base_model = base_model.get_base_model()
    _check_task(base_model, config, config_path)
    loads_as = copy.copy(config)  # the config as PEFT loads it: the task's heads are saved whole, not adapted
    saved_whole = [*(config.modules_to_save or ()), *TASK_HEADS.get(task, ())]
    loads_as.modules_to_save = list(dict.fromkeys(saved_whole)) or None
    try:
        expected = _expected_tensors(base_model, loads_as, config_path)
    except re.error as err:  # target_modules, exclude_modules and the pattern keys are regular expressions to PEFT
        raise InputError(f"{config_path}: {_short(err.pattern)} is not a valid regular expression ({err})") from None
    _check_weights(weights_path, expected)
    return config


def load_adapter_safely(base_model: nn.Module, adapter_dir: str | os.PathLike, expected_base: str | None = None,
                        is_trainable: bool = False, adapter_name: str = "default") -> peft.PeftModel:
    """`verify_adapter`, then `peft.PeftModel.from_pretrained`, or `PeftModel.load_adapter` when `base_model` is
    already a PeftModel (the new adapter is loaded beside the others, not made active, as PEFT does). The directory
    must not change in between: verify a local copy that only you can write.

    On success `base_model` is changed in place, as PEFT does. On any failure, in verification or later inside
    PEFT (which injects the adapter layers before it builds the task's PeftModel and loads the weights), the
    exception propagates and `base_model` is as it was: its module tree, attributes, parameters (the same
    tensors) and their requires_grad, and its config. This is undone from a snapshot of each module's attribute
    dicts, not by copying the model: O(modules) in time and memory, whatever the size of the weights.
    """
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise InputError(f"adapter_name is {adapter_name!r}; expected a non-empty name without dots")
    loaded = set(getattr(base_model, "peft_config", {})) if isinstance(base_model, peft.PeftModel) else set()
    if adapter_name in loaded:  # PEFT would pour the new weights into the loaded adapter, its config unchecked
        raise InputError(f"adapter_name {adapter_name!r} is already loaded in this model; expected a new name "
                         f"(loaded: {', '.join(sorted(loaded))})")
    verify_adapter(base_model, adapter_dir, expected_base)
    undo = snapshot(base_model)
    try:
        if isinstance(base_model, peft.PeftModel):
            base_model.load_adapter(str(adapter_dir), adapter_name, is_trainable=is_trainable)
            return base_model
        return peft.PeftModel.from_pretrained(base_model, str(adapter_dir), adapter_name=adapter_name,
                                              is_trainable=is_trainable)
    except BaseException:
        undo()
        raise


def _check_task(model: nn.Module, config: peft.PeftConfig, path: Path) -> None:
    """PEFT picks the PeftModel class from task_type: one that does not fit the model fails inside PEFT, after the
    adapter layers are injected (CAUSAL_LM on a classifier), or at the first forward pass."""
    from transformers import PreTrainedModel
    from transformers.models.auto import modeling_auto

    task = getattr(config.task_type, "value", config.task_type)
    if task is None:
        return  # a plain PeftModel: any model
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise InputError(f"{path}: task_type is {task!r}, which needs a transformers model, and the base model "
                         f"{name} is not one; expected task_type null")
    fits = set()
    for kind, mapping in TASK_MAPPINGS.items():
        for names in getattr(modeling_auto, mapping).values():
            if name in ((names,) if isinstance(names, str) else names):
                fits.add(kind)
    if fits and task not in fits:  # a class in no mapping (remote code, multimodal) cannot be told: accepted
        raise InputError(f"{path}: task_type is {task!r}, which does not fit the base model {name}; "
                         f"expected {' or '.join(sorted(fits))} (or null)")


def _check_scale(config: peft.PeftConfig, name: str, rank: int, path: Path) -> None:
    """The scale of module `name`: lora_alpha (alpha_pattern's if a key matches) / r, or / sqrt(r) (rsLoRA);
    for SoRA, r is the module's r_max (rank_pattern's), which pruning never changes."""
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
    rslora = config.use_rslora
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        formula = "lora_alpha / sqrt(r)" if rslora else "lora_alpha / r"
        raise InputError(f"{path}: the scale of {name!r}, {formula}, is {alpha!r} / {rank} = {scale:.4g}; "
                         f"expected |scale| <= {MAX_SCALE:g}")


def _matches(config: peft.PeftConfig, key: str) -> bool:
    return bool(check_target_module_exists(config, key))  # an excluded module is falsy too


def _targets(model: nn.Module, config: peft.PeftConfig, path: Path) -> list[str]:
    """The module paths PEFT will adapt; every target_modules entry must match at least one."""
    targets = config.target_modules
    if not targets:
        raise InputError(f"{path}: target_modules is empty; expected the module names the adapter was saved with")
    names = [name for name in _base_modules(model) if name]
    for entry in [targets] if isinstance(targets, str) else sorted(targets):
        probe = copy.copy(config)
        probe.target_modules = entry if isinstance(targets, str) else {entry}
        # An entry may name only modules PEFT leaves out: excluded ("all-linear" is saved as the list before
        # exclude_modules) or saved whole (a head both targeted and in modules_to_save)
        probe.exclude_modules, probe.modules_to_save = None, None
        if not any(_matches(probe, name) for name in names):
            raise InputError(f"{path}: target_modules entry {entry!r} matches no module of the base model "
                             f"{type(model).__name__}; {_closest_names(model, [entry])}")
    return [name for name in names if _matches(config, name)]


def _rank(config: peft.PeftConfig, name: str, path: Path) -> int:
    if config.peft_type == "SORA":
        return config.rank_of(name)  # SoraConfig has checked it is in [0, r_max], rank_pattern included
    rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"{path}: LoRA rank of {name!r} is {rank!r}; expected a positive integer")
    return rank


def _in_out(module: nn.Module, name: str, path: Path) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D and isinstance(module, Conv1D):
        return tuple(module.weight.shape)  # Conv1D stores (in, out)
    raise InputError(f"{path}: target module {name!r} is a {type(module).__name__}; expected nn.Linear or Conv1D")


def _expected_tensors(model: nn.Module, config: peft.PeftConfig, path: Path) -> dict[str, tuple[tuple, bool]]:
    """Saved key -> (shape, is float) of every tensor the adapter must hold, and no other."""
    modules = _base_modules(model)
    kind = "sora" if config.peft_type == "SORA" else "lora"
    expected, targets = {}, _targets(model, config, path)
    for name in targets:
        (n_in, n_out), rank = _in_out(modules[name], name, path), _rank(config, name, path)
        _check_scale(config, name, config.r_max_of(name) if kind == "sora" else rank, path)  # SoRA: by r_max
        expected[f"{PREFIX}{name}.{kind}_A.weight"] = ((rank, n_in), True)
        expected[f"{PREFIX}{name}.{kind}_B.weight"] = ((n_out, rank), True)
        if kind == "sora":
            expected[f"{PREFIX}{name}.sora_gate"] = ((rank,), True)
    stray = sorted(set(getattr(config, "kept_ranks", {})) - set(targets))
    if stray:
        raise InputError(f"{path}: kept_ranks names {stray[0]!r}, which is not adapted; expected only target modules")
    for name, module in modules.items():  # PEFT's own modules_to_save rule: a plain suffix match
        if name and any(name.endswith(m) for m in config.modules_to_save or ()):
            for key, tensor in module.state_dict().items():
                expected[f"{PREFIX}{name}.{key}"] = (tuple(tensor.shape), tensor.is_floating_point())
    return expected


def _base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of the model without its adapters: a module an adapter wraps counts as the layer it wraps
    (`get_base_layer`, or a modules_to_save wrapper's original module), and the adapters' own modules are left out."""
    modules, wrapped = {}, ()
    for name, module in model.named_modules():
        if wrapped and name.startswith(wrapped):
            continue
        if isinstance(module, BaseTunerLayer):
            module, wrapped = module.get_base_layer(), wrapped + (f"{name}.",)
        elif isinstance(module, AuxiliaryTrainingWrapper):
            module, wrapped = module.original_module, wrapped + (f"{name}.",)
        modules[name] = module
    return modules


def _check_weights(path: Path, expected: dict[str, tuple[tuple, bool]]) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"{path}: not a valid safetensors file ({_one_line(err)})") from None
    missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing:
        raise InputError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all); "
                         f"expected shape {expected[missing[0]][0]} for this base model and config")
    base = next((key for key in extra if ".base_layer." in key), None)
    if base is not None:  # PEFT's save_embedding_layers: lm_head or embed_tokens saved whole beside its LoRA
        raise InputError(f"{path}: tensor {base!r} is a base-model weight, which loading would put in place of the "
                         "model's own; expected adapter weights only (save with save_embedding_layers=False, or "
                         "export with soralib.export_lora)")
    if extra:
        raise InputError(f"{path}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all); "
                         f"expected only the {len(expected)} keys this base model and config give")
    for key, (shape, dtype) in sorted(header.items()):
        want_shape, want_float = expected[key]
        if shape != want_shape:
            raise InputError(f"{path}: tensor {key!r} has shape {shape}; expected {want_shape}")
        if (dtype in FLOAT_DTYPES) != want_float:
            kind = f"a float dtype ({', '.join(FLOAT_DTYPES)})" if want_float else "the base model's non-float dtype"
            raise InputError(f"{path}: tensor {key!r} has dtype {dtype}; expected {kind}")
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in sorted(header):
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise InputError(f"{path}: tensor {key!r} has NaN or Inf values; expected finite numbers")
                factor = re.search(r"\.(lora|sora)_(A|B)\.weight$|\.sora_gate$", key) and tensor.numel()
                largest = tensor.abs().max().item() if factor else 0.0
                if largest > MAX_WEIGHT:
                    raise InputError(f"{path}: tensor {key!r} holds values up to {largest:.3g} in size; expected "
                                     f"|value| <= {MAX_WEIGHT:g} (trained adapter weights are near 1)")
    except (SafetensorError, OSError) as err:
        raise InputError(f"{path}: not a valid safetensors file ({_one_line(err)})") from None