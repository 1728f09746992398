"""Read an adapter directory as data, before any model is involved: its files, and its config checked field by field.

    config = read_adapter_config(Path("adapter/"), expected_base="bert-base-uncased")

The config is parsed with `json` (no NaN or Infinity, bounded depth), and every field it sets is checked for its
type before PEFT's config class sees it: the config classes do not check types, and JSON can put any type
anywhere. Which modules and tensors the config means for a given model is `verify.py`'s part.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import reprlib
from pathlib import Path

import peft
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

from . import model as _model  # noqa: F401 (importing it registers "SORA", which PEFT_TYPE_TO_CONFIG_MAPPING needs)
from .errors import InputError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
PEFT_TYPES = ("LORA", "SORA")
# A rank above 2**20 exceeds every weight matrix's side; bounding it also keeps lora_alpha / r a computable float.
MAX_RANK = 2**20
# A PEFT config is 3 levels deep at most; deeper JSON is refused before anything recurses into it.
MAX_DEPTH = 32
# The LoRA fields a plain LoRA uses. Every other one (DoRA, bias, Megatron, PiSSA and other initialisations, ...)
# must keep its default: they add tensors, change the layers or base weights, or make PEFT import a named module.
LORA_FIELDS = {"peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
               "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
               "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
               "fan_in_fan_out", "use_rslora"}
# Values besides the default that only choose the starting A and B, which the file's tensors then replace.
START_ONLY = {"init_lora_weights": (True, False, "gaussian")}

# Named for the public module: the warning about ignored pickles is filtered by "soralib.verify", as before.
logger = logging.getLogger("soralib.verify")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# JSON can put any type anywhere, and the config classes do not check types: the fields used here must have these.
_NAMES = (lambda v: v is None or isinstance(v, str) or _strings(v), "null, a string or a list of strings")
_NUMBER_MAP = (lambda v: isinstance(v, dict) and all(map(_number, v.values())), "an object of module name -> number")
FIELD_TYPES = {
    "target_modules": (lambda v: isinstance(v, str) or _strings(v), "a string or a list of strings"),
    "exclude_modules": _NAMES,
    "layers_pattern": _NAMES,
    "modules_to_save": (lambda v: v is None or _strings(v), "null or a list of strings"),
    "layers_to_transform": (lambda v: v is None or type(v) is int or isinstance(v, list)
                            and all(type(x) is int for x in v), "null, an integer or a list of integers"),
    "lora_alpha": (_number, "a number"),
    "lora_dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "rank_pattern": _NUMBER_MAP,
    "alpha_pattern": _NUMBER_MAP,
    "kept_ranks": _NUMBER_MAP,
}


def read_adapter_config(adapter_dir: Path, expected_base: str | None) -> peft.PeftConfig:
    """Check that `adapter_dir` holds the files of an adapter (no pickle-only weights), then read and return its
    config; raise `InputError` naming the file and what was expected if anything is off."""
    _check_files(adapter_dir, adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME)
    return _read_config(adapter_dir / CONFIG_NAME, expected_base)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _short(value) -> str:
    """A bounded repr for messages: a hostile config can hold huge or deeply nested values."""
    return reprlib.repr(value)


def _check_files(adapter_dir: Path, config_path: Path, weights_path: Path) -> None:
    if not adapter_dir.is_dir():
        raise InputError(f"{adapter_dir}: not a directory; expected a directory with {CONFIG_NAME} and {WEIGHTS_NAME}")
    pickles = sorted(p.name for p in adapter_dir.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles and not weights_path.is_file():
        raise InputError(f"{adapter_dir / pickles[0]}: pickle weights refused (unpickling can run arbitrary code); "
                         f"expected {WEIGHTS_NAME}: convert on a trusted machine with safetensors.torch.save_file")
    if pickles:
        logger.warning("%s: ignoring pickle file(s) %s; only %s is read", adapter_dir, ", ".join(pickles), WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not path.is_file():
            raise InputError(f"{path}: missing; expected an adapter directory with {CONFIG_NAME} and {WEIGHTS_NAME}"
                             f"{_subfolder_hint(adapter_dir)}")


def _subfolder_hint(adapter_dir: Path) -> str:
    """PEFT saves an adapter not named "default" to a subfolder of its name: point there."""
    found = sorted(p.parent.name for p in adapter_dir.glob(f"*/{CONFIG_NAME}"))
    if not found:
        return ""
    return f" (found in subfolder{'s' * (len(found) > 1)} {', '.join(found)}: pass {adapter_dir / found[0]})"


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def _depth(value) -> int:
    """How deeply lists and objects nest in parsed JSON, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def _read_config(path: Path, expected_base: str | None) -> peft.PeftConfig:
    too_deep = f"{path}: the JSON nests more than {MAX_DEPTH} levels deep; expected a PEFT adapter config"
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{path}: not valid JSON ({_one_line(err)}); expected a PEFT adapter config") from None
    except RecursionError:  # the parser recurses once per level
        raise InputError(too_deep) from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: the JSON is a {type(data).__name__}; expected an object")
    if _depth(data) > MAX_DEPTH:  # what parsed can still be too deep for the repr, copy and checks below
        raise InputError(too_deep)
    peft_type = data.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise InputError(f"{path}: peft_type {peft_type!r}; expected one of {', '.join(PEFT_TYPES)}")
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    _check_fields(data, config_cls, path)
    _check_numbers(data, path)
    try:
        config = config_cls(**data)
    except (TypeError, ValueError) as err:
        raise InputError(f"{path}: invalid {peft_type} config: {_one_line(err)}") from None
    base = config.base_model_name_or_path
    if expected_base is not None and base and base != expected_base:
        raise InputError(f"{path}: base_model_name_or_path is {base!r}; expected {expected_base!r}")
    return config


def _check_fields(data: dict, config_cls: type, path: Path) -> None:
    """Known fields only, of the types used here; a LoRA uses no field beyond plain LoRA's."""
    fields = dataclasses.fields(config_cls)
    unknown = sorted(set(data) - {field.name for field in fields})
    if unknown:
        raise InputError(f"{path}: unknown field {unknown[0]!r}; expected only {config_cls.__name__} fields")
    for name, (valid, kind) in FIELD_TYPES.items():
        if name in data and not valid(data[name]):
            raise InputError(f"{path}: {name} is {data[name]!r}; expected {kind}")
    for field in fields if data["peft_type"] == "LORA" else ():
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        value = data.get(field.name, default)
        allowed = START_ONLY.get(field.name, (default,))
        same = any((type(value), value) == (type(a), a) for a in allowed)  # by type too: 1 is not True
        if field.name not in LORA_FIELDS and not same:
            expected = " or ".join(map(repr, allowed)) if len(allowed) > 1 else f"{default!r}, its default"
            raise InputError(f"{path}: {field.name} is {value!r}; expected {expected} "
                             "(only plain LoRA adapters are verified)")


def _finite(number) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # a JSON integer beyond float's range
        return False


def _check_numbers(data: dict, path: Path) -> None:
    """Finite alphas and bounded ranks, so that every scale below is a finite float (JSON's 1e400 parses as inf)."""
    alphas = {"lora_alpha": data.get("lora_alpha", 0)}
    alphas.update({f"alpha_pattern[{k!r}]": v for k, v in (data.get("alpha_pattern") or {}).items()})
    for name, alpha in alphas.items():
        if not _finite(alpha):
            raise InputError(f"{path}: {name} is {_short(alpha)}; expected a finite number")
    r = data.get("r")
    if type(r) is int and r > MAX_RANK:  # other bad values of r get the config class's own message
        raise InputError(f"{path}: r is {_short(r)}; expected a positive integer <= {MAX_RANK}")
    for key, rank in (data.get("rank_pattern") or {}).items():
        if type(rank) is not int or not 1 <= rank <= MAX_RANK:
            raise InputError(f"{path}: rank_pattern[{key!r}] is {_short(rank)}; expected an integer in [1, {MAX_RANK}]")
