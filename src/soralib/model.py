"""The thin PEFT glue: SoraModel (a BaseTuner) and SoRA's registration in PEFT's registries."""

from __future__ import annotations

import copy
import difflib

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from .config import SoraConfig, SoraPeftType
from .layer import EMBEDDING_ADVICE, SUPPORTED_LAYERS, Conv1D, SoraLayer, SoraLinear, TrainingCheck

PREFIX = "sora_"


class SoraModel(BaseTuner):
    """Replaces each targeted linear layer of `model` with a `SoraLinear` wrapping it."""

    prefix: str = PREFIX
    tuner_layer_cls = SoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(self, config: SoraConfig, adapter_name, target, target_name, parent, current_key,
                            **kwargs) -> None:
        args = dict(r_max=config.r_max_of(current_key), rank=config.rank_of(current_key),
                    lora_alpha=config.alpha_of(current_key), lora_dropout=config.lora_dropout,
                    gate_init=config.gate_init, use_rslora=config.use_rslora)
        if isinstance(target, SoraLinear):
            target.update_layer(adapter_name, **args, inference_mode=config.inference_mode)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Embedding):
            raise ValueError(f"target module {current_key!r} is an nn.Embedding: {EMBEDDING_ADVICE}")
        if not isinstance(base, (nn.Linear, Conv1D) if Conv1D else nn.Linear):
            raise ValueError(
                f"target module {current_key!r} has type {type(base).__name__}; allowed: {SUPPORTED_LAYERS}"
            )
        new_module = SoraLinear(target, adapter_name, **args)
        if getattr(self, "_sora_check", None) is None:
            self._sora_check = TrainingCheck()
        new_module._sora_check = self._sora_check  # one unthresholded-gates warning per model, not per layer
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # a second adapter is not trained unless it is made active
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        _check_modules_to_save(model, self.peft_config[adapter_name])  # before the model is touched
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as err:
            config = self.peft_config[adapter_name]
            hint = _layers_hint(model, config) or f"; {_closest_names(model, config.target_modules)}"
            raise ValueError(f"{err.args[0].split('. ')[0]}{hint}") from None


# The head names PEFT itself appends to modules_to_save, per task type, whether or not the model has them
# (a Llama has "score", no "classifier"): not the user's entries, so never rejected.
PEFT_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


def _check_modules_to_save(model: nn.Module, config: SoraConfig) -> None:
    """PEFT silently ignores a modules_to_save entry that matches no module: a typo would go untrained, unsaved."""
    names = [name for name, _ in model.named_modules(remove_duplicate=False)]
    own = PEFT_HEADS.get(config.task_type, ())
    for wanted in config.modules_to_save or ():
        if wanted not in own and not any(name.endswith(wanted) for name in names):  # PEFT's rule: a plain suffix
            raise ValueError(f"modules_to_save entry {wanted!r} matches no module of the model; "
                             f"{_closest_names(model, [wanted], linear_only=False)}")


def _layers_hint(model: nn.Module, config: SoraConfig) -> str:
    """With layers_to_transform, the layer indexes the targets are in (by PEFT's own rule): the closest names would be
    the targets themselves, and PEFT's note naming the layers is cut off with the rest of its message."""
    layers, pattern = config.layers_to_transform, config.layers_pattern
    if layers is None:
        return ""
    found = _target_layers(model, config, pattern)
    if found:
        return f" in layers_to_transform={layers!r}; the targets are in layers {found}"
    found = _target_layers(model, config, None) if pattern else ""
    if found:
        return (f" in layers_to_transform={layers!r} with layers_pattern={pattern!r}, which names no layer list holding "
                f"them; without layers_pattern the targets are in layers {found}")
    return ""


def _target_layers(model: nn.Module, config: SoraConfig, pattern) -> str:
    """The layer indexes holding a target module, as PEFT finds them with `pattern` as layers_pattern."""
    keys = [name for name, _ in model.named_modules()]
    probe = copy.copy(config)
    probe.layers_pattern = pattern
    found = []
    for i in sorted({int(part) for key in keys for part in key.split(".") if part.isdigit()}):
        probe.layers_to_transform = i
        if any(check_target_module_exists(probe, key) for key in keys):
            found.append(str(i))
    return ", ".join(found)


def _closest_names(model: nn.Module, targets, linear_only: bool = True) -> str:
    """The module names that look most like the requested targets, to put in the error message."""
    kind = ((nn.Linear, Conv1D) if Conv1D else nn.Linear) if linear_only else nn.Module
    leaves = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, kind)})
    wanted = [targets] if isinstance(targets, str) else sorted(targets or [])
    close = sorted({c for t in wanted for c in difflib.get_close_matches(t, leaves, n=3, cutoff=0.4)})
    what = "linear modules" if linear_only else "modules"
    return f"closest {what}: {', '.join(close or leaves[:10]) or f'none (the model has no {what})'}"


def register() -> None:
    """Make PEFT (and transformers' adapter API) know the "SORA" type. Idempotent."""
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[SoraPeftType.SORA] = SoraConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[SoraPeftType.SORA] = SoraModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[SoraPeftType.SORA] = PREFIX


# Registered on import, so that whatever imports this module or soralib.config (which imports it) can hand a
# SoraConfig or a saved SoRA adapter to PEFT, whichever soralib module it came through.
register()
